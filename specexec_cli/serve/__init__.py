"""`specexec serve`: the OpenAI API over HTTP. protocol.py (request and response bodies), scheduler.py
(the engine thread: requests as lanes of one batch), metrics.py (Prometheus counters), app.py (routes and
the uvicorn server)."""
