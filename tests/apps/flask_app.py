"""The classic Flask long-polling tutorial, rewritten on a hub (as
docs/embedding.md shows it): /send and /receive unchanged for their
clients, without the busy-wait or the global list; longpoll mounted at
/push as WSGI for the rest; the app's own views publish with hub.publish()."""
from flask import Flask, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import longpoll

hub = longpoll.Hub()
app = Flask(__name__)
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/push": longpoll.wsgi_app(hub)})


@app.post("/send")  # the tutorial's two routes, unchanged for their clients
def send():
    message = request.form.get("message") or (request.get_json(silent=True) or {}).get("message")
    hub.publish("default", message)  # kept until a taker comes: nothing lost
    return jsonify(status="Message sent.")


@app.get("/receive")
def receive():
    msg = hub.take("default", timeout=30)  # sleeps until a message: no busy-wait
    return jsonify(message=msg.message if msg else None)


@app.post("/notify/<channel>")
def notify(channel):
    return jsonify(id=hub.publish(channel, request.args["text"]).id)
