"""gunicorn's settings for `gunicorn app:app` started in the repository (the Procfile does). They live in
web/gunicorn_conf.py so that an installed package has them too: `gunicorn -c python:web.gunicorn_conf app:app`."""

from web.gunicorn_conf import *  # noqa: F403
