# QuotaUsage now lives in usage (usage.0002 took it over, same table): state only.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('tenants', '0002_quotausage'),
        ('usage', '0002_quotausage_from_tenants'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name='QuotaUsage')],
            database_operations=[],
        ),
    ]
