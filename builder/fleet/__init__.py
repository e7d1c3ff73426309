"""The fleet control plane, in three rooms:

* ``transport``: the host's MQTT link, broker configuration and the embedded broker, the chunk
  server, `builder serve`, the fleet store (every table of the fleet's SQLite file) and device registration;
* ``rollout``: push with canary and rollback, on-device trials, fleet status and plots;
* ``loop``: the re-compression loop (policy, the pure controller, the service inside `builder serve`).
"""
