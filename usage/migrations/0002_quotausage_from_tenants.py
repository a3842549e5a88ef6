# The model QuotaUsage moves from tenants to usage; its table stays (db_table), so this
# changes Django's state only. tenants.0003 removes it from the tenants app's state.

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0002_quotausage'),
        ('usage', '0001_initial'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='QuotaUsage',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('month', models.DateField(help_text='The first day of the month (UTC).')),
                        ('audio_seconds', models.FloatField(default=0.0)),
                        ('tenant', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='quota_usage', to='tenants.tenant')),
                    ],
                    options={
                        'db_table': 'tenants_quotausage',
                        'constraints': [models.UniqueConstraint(fields=('tenant', 'month'), name='quota_usage_unique_per_month')],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
