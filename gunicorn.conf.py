"""gunicorn's settings for `gunicorn app:app` started in the repository (the Procfile does). They live in
pneumonia/web/gunicorn_conf.py so that an installed package has them too:
`gunicorn -c python:pneumonia.web.gunicorn_conf 'pneumonia.web:create_app()'`."""

from pneumonia.web.gunicorn_conf import *  # noqa: F403
