"""`builder fleet simulate`: N simulated devices in one process, on one asyncio event loop, speaking
the real protocol through the agent's own modules (``agent.protocol``, ``agent.transfer``'s
signature check, ``ChunkFrame.verify``, the manifest's payload hashes) with synthetic inference
results. The benchmark of issue 16 (``bench/fleet.py``) and a tool for sizing a broker.
"""
