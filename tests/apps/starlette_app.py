"""A Starlette app with longpoll mounted at /push (docs/embedding.md)."""
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import longpoll

hub = longpoll.Hub()


async def notify(request):
    return JSONResponse({"id": hub.publish(request.path_params["channel"],
                                           request.query_params["text"]).id})


app = Starlette(routes=[
    Route("/notify/{channel}", notify, methods=["POST"]),
    Mount("/push", app=longpoll.asgi_app(hub)),
])
