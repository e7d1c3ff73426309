"""Helpers shared by test areas (real Mosquitto broker, test certificates)."""
