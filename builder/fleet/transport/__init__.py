"""Host <-> devices: the MQTT link, broker configuration, the embedded broker, the chunk server,
`builder serve`, the fleet store and device registration."""
