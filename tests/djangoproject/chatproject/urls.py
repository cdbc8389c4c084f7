"""The project's HTTP routes: views that publish, as server code of the original app would."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

from chat import views
from django.urls import path

urlpatterns = [
    path("publish", views.publish),
    path("apublish", views.apublish),
    path("event", views.event),
    path("send", views.send),
    path("join", views.join),
    path("leave", views.leave),
]
