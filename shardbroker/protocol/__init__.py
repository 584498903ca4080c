"""The sans-I/O MQTT protocol core: packets, codec, reason codes and topic rules.

Imports only the standard library. No sockets, clocks or event loops live here.
"""
