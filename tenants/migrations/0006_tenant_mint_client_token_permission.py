from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0005_tenant_allowed_origins"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="tenant",
            options={"ordering": ["name"], "permissions": [("mint_client_token", "Can mint client tokens")]},
        ),
    ]
