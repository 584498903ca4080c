"""The broker core's side of a cluster node's fence, without a loop: the shell's admission
check refuses a CONNECT at the attach (CONNACK 0x88 in 5.0, return code 3 in 3.1.1; no
session is made), and ``close_unserved`` ends the clients it no longer serves (5.0:
DISCONNECT 0x9C Use another server), keeping their stored sessions."""

from __future__ import annotations

from pathlib import Path

from core_harness import Harness

from shardbroker.protocol import reasons
from shardbroker.protocol.packets import MQTT_3_1_1, MQTT_5, ConnAck, Disconnect, Properties


def test_the_admission_check_refuses_at_the_attach(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        h.broker.handshake.admit = lambda cid: None if cid.startswith("ok") else "not served here"
        for version, code in ((MQTT_5, reasons.SERVER_UNAVAILABLE),
                              (MQTT_3_1_1, reasons.V3_SERVER_UNAVAILABLE)):
            c = h.connect(f"no{version}", version, clean=False,
                          properties=Properties(session_expiry_interval=60))
            ack, = c.packets()
            assert isinstance(ack, ConnAck) and ack.reason_code == code and c.transport.closed
            assert h.broker.sessions.get(f"no{version}") is None
        c = h.connect("ok1", MQTT_5)
        ack, = c.packets()
        assert isinstance(ack, ConnAck) and ack.reason_code == 0
    finally:
        h.close()


def test_clients_no_longer_served_are_closed_with_0x9c(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        keep = h.connect("keep", MQTT_5)
        gone5 = h.connect("gone5", MQTT_5, clean=False,
                          properties=Properties(session_expiry_interval=600))
        gone4 = h.connect("gone4", MQTT_3_1_1, clean=False)
        for c in (keep, gone5, gone4):
            c.packets()
        closed = h.broker.close_unserved(lambda cid: cid == "keep", "moved", h.now)
        h.run()
        assert closed == 2
        d, = gone5.packets()
        assert isinstance(d, Disconnect) and d.reason_code == reasons.USE_ANOTHER_SERVER
        assert gone5.transport.closed and gone4.transport.closed and gone4.packets() == []
        assert not keep.transport.closed
        assert h.store.has_session("gone5") and h.store.has_session("gone4")
    finally:
        h.close()
