"""A FastAPI app with longpoll mounted at /push (docs/embedding.md's
example): its own routes publish with hub.publish()."""
from fastapi import FastAPI

import longpoll

hub = longpoll.Hub()
app = FastAPI()
app.mount("/push", longpoll.asgi_app(hub))


@app.post("/notify/{channel}")
def notify(channel: str, text: str) -> dict:  # a sync route: FastAPI runs it on a thread
    return {"id": hub.publish(channel, text).id}


@app.post("/anotify/{channel}")
async def anotify(channel: str, text: str) -> dict:  # an async one: on the event loop
    return {"id": hub.publish(channel, text).id}
