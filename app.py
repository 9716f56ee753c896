"""WSGI entry point: `gunicorn app:app` (see gunicorn.conf.py), or `flask --app app run`.

Importing this module loads the model, once in each gunicorn worker.
"""

from pneumonia.web import create_app

app = create_app()
