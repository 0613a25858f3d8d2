"""The classic Flask long-polling tutorial, rewritten: longpoll mounted at
/push as WSGI (no busy-wait, one global list no more, nothing lost); the
app's own views publish with hub.publish() (docs/embedding.md)."""
from flask import Flask, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import longpoll

hub = longpoll.Hub()
app = Flask(__name__)
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/push": longpoll.wsgi_app(hub)})


@app.post("/notify/<channel>")
def notify(channel):
    return jsonify(id=hub.publish(channel, request.args["text"]).id)
