"""`python -m callwaiting_tts.serve`: start Daphne on the configured HOST and PORT."""

import os


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "callwaiting_tts.settings")
    from daphne.cli import CommandLineInterface
    from django.conf import settings

    CommandLineInterface().run(
        ["-b", settings.HOST, "-p", str(settings.PORT), "callwaiting_tts.asgi:application"]
    )


if __name__ == "__main__":
    main()
