"""A Django project in one file, served over ASGI, whose router sends /push/
to longpoll (docs/embedding.md): uvicorn django_app:application"""
import django
from django.conf import settings

import longpoll

settings.configure(DEBUG=False, SECRET_KEY="only-for-this-example", ALLOWED_HOSTS=["*"],
                   ROOT_URLCONF=__name__, MIDDLEWARE=[])
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402 (after setup)
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

hub = longpoll.Hub()
push = longpoll.asgi_app(hub)


def notify(request, channel):
    return JsonResponse({"id": hub.publish(channel, request.GET["text"]).id})


urlpatterns = [path("notify/<str:channel>", notify)]
django_asgi = get_asgi_application()


async def application(scope, receive, send):
    """/push/... to longpoll (its root_path says where it is mounted), the rest to Django."""
    if scope["type"] in ("http", "websocket") and scope["path"].startswith("/push/"):
        await push(dict(scope, root_path=scope.get("root_path", "") + "/push"), receive, send)
    else:
        await django_asgi(scope, receive, send)
