"""A FastAPI app with longpoll mounted at /push (docs/embedding.md's
example): its own routes publish with hub.publish()."""
from contextlib import asynccontextmanager

from fastapi import FastAPI

import longpoll

hub = longpoll.Hub()
push = longpoll.asgi_app(hub)


@asynccontextmanager
async def lifespan(app):
    yield
    push.close()  # answers every waiting client (a mount does not get the lifespan)


app = FastAPI(lifespan=lifespan)
app.mount("/push", push)


@app.post("/notify/{channel}")
def notify(channel: str, text: str) -> dict:  # a sync route: FastAPI runs it on a thread
    return {"id": hub.publish(channel, text).id}


@app.post("/anotify/{channel}")
async def anotify(channel: str, text: str) -> dict:  # an async one: on the event loop
    return {"id": hub.publish(channel, text).id}
