"""The wire protocol between the builder and its agents: every MQTT topic and message, version 1.

This module is the only door between ``builder/`` and ``agent/``; ``docs/protocol.md`` describes
the same contract for a native (non-Python) agent.

Topic layout (``{id}`` is the device id, which is also its MQTT username and client id)::

    edgefleet/v1/devices/{id}/up/status     device -> host  retained; last will = state "offline"
    edgefleet/v1/devices/{id}/up/hello      device -> host  on every (re)connect
    edgefleet/v1/devices/{id}/up/chunkreq   device -> host  a window of chunks wanted
    edgefleet/v1/devices/{id}/up/progress   device -> host  transfer/install progress and outcome
    edgefleet/v1/devices/{id}/up/telemetry  device -> host  periodic and event telemetry (QoS 1)
    edgefleet/v1/devices/{id}/up/reply      device -> host  reply to a command (same request_id)
    edgefleet/v1/devices/{id}/down/desired  host -> device  retained: the deployment it must run
    edgefleet/v1/devices/{id}/down/chunks   host -> device  binary chunk frames (see ChunkFrame)
    edgefleet/v1/devices/{id}/down/cmd      host -> device  commands
    edgefleet/v1/devices/{id}/down/ack      host -> device  telemetry stored (TelemetryAck)

A device publishes only under ``up/`` and reads only under ``down/`` of its own id, so two pattern
ACL lines confine it (``pattern write edgefleet/v1/devices/%u/up/#`` and ``pattern read
edgefleet/v1/devices/%u/down/#``): it can neither read another device's topics nor publish a
desired deployment. Every JSON message carries ``"schema": 1``; a receiver refuses other versions
with ``ProtocolError``. Chunks are binary frames, not base64-in-JSON (33% smaller, no decode cost).

Decoding is bounded: every payload is checked against its kind's size limit (``MAX_BYTES``) and a
nesting depth limit (``MAX_JSON_DEPTH``) *before* it is parsed, NaN/Infinity are refused, and each
known field must have its declared JSON type (a list where an id belongs is refused, not hashed).
Whatever is wrong with a message, decoding raises ``ProtocolError`` and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from dataclasses import Field, asdict, dataclass, field, fields
from itertools import accumulate
from typing import Any, Iterable, Mapping, Self, TypeVar

from agent.errors import ProtocolError

PROTOCOL_VERSION = 1
SCHEMA = PROTOCOL_VERSION
TOPIC_ROOT = f"edgefleet/v{PROTOCOL_VERSION}"
DEVICES_ROOT = f"{TOPIC_ROOT}/devices"

# Brokers such as AWS IoT Core cap messages at 128 KiB; a frame's header is well under 1 KiB.
MAX_CHUNK_BYTES = 128 * 1024 - 1024
DEFAULT_WINDOW_CHUNKS = 64  # 8 MiB in flight; measured on loopback: 16 starves the pipeline
CHUNK_MAGIC = b"EFC1"
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Up:
    """Topic suffixes a device publishes."""

    STATUS = "up/status"
    HELLO = "up/hello"
    CHUNK_REQUEST = "up/chunkreq"
    PROGRESS = "up/progress"
    TELEMETRY = "up/telemetry"
    REPLY = "up/reply"


class Down:
    """Topic suffixes a device subscribes to."""

    DESIRED = "down/desired"
    CHUNKS = "down/chunks"
    COMMAND = "down/cmd"
    ACK = "down/ack"


def validate_device_id(device_id: str) -> str:
    """Device ids become topic levels and MQTT usernames: no '/', '+', '#', spaces; 1-64 chars."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
        raise ProtocolError(f"device id {device_id!r} is invalid; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return device_id


def device_topic(device_id: str, suffix: str) -> str:
    return f"{DEVICES_ROOT}/{validate_device_id(device_id)}/{suffix}"


def all_devices_topic(suffix: str) -> str:
    """Subscription filter for one kind of message from every device (host side)."""
    return f"{DEVICES_ROOT}/+/{suffix}"


def parse_device_topic(topic: str) -> tuple[str, str]:
    """``edgefleet/v1/devices/{id}/up/x`` -> (id, "up/x"); ProtocolError for anything else."""
    prefix = DEVICES_ROOT + "/"
    if not topic.startswith(prefix):
        raise ProtocolError(f"topic {topic!r} is not an EdgeFleet v{PROTOCOL_VERSION} device topic")
    parts = topic[len(prefix):].split("/", 1)
    if len(parts) != 2 or not parts[1]:
        raise ProtocolError(f"topic {topic!r} has no message kind")
    return validate_device_id(parts[0]), parts[1]


def now_s() -> float:
    return round(time.time(), 3)


# ---------------------------------------------------------------------------------------------
# JSON messages


# Bounds checked before any payload is parsed (a 200 kB "[[[[..." must not reach json.loads: its
# recursion limit raises RecursionError, which no handler expected). The sizes are generous for
# what the agent and the host really send (a telemetry report is ~1 KiB, a desired deployment with
# its inline manifest a few KiB).
MAX_JSON_DEPTH = 32
MAX_MESSAGE_BYTES = 256 * 1024  # the default limit of a JSON message
MAX_CHUNK_HEADER_BYTES = 8192
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# opening brackets -> 0x01, closing -> 0xff (-1 as a signed byte), everything else deleted
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[{]}")


def json_depth(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text, without parsing it (string contents ignored).
    Linear, and in C for the common case: a regex strips the strings, ``translate`` keeps only
    brackets as +1/-1 bytes, ``accumulate`` sums them."""
    stripped = _STRING_RE.sub(b"", raw) if b'"' in raw else raw
    brackets = stripped.translate(_BRACKETS, _NOT_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(accumulate(memoryview(brackets).cast("b"))))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def decode_json(raw: bytes | str, kind: str, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """The one bounded JSON decoder of the protocol: size, then depth, then parse (no NaN or
    Infinity). Any failure is a ``ProtocolError``."""
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise ProtocolError(f"{kind} message of {len(data)} bytes exceeds its limit of {max_bytes} bytes")
    if not data.strip():
        raise ProtocolError(f"{kind} message is empty")
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{kind} message nests {depth} levels deep (limit {MAX_JSON_DEPTH})")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{kind} message is not valid JSON ({exc})") from exc


def request_id_of(raw: bytes, kind: str = "cmd", max_bytes: int = MAX_MESSAGE_BYTES) -> str | None:
    """The ``request_id`` of a message that failed to decode, if it has a usable one (so the
    sender can be told why); None otherwise. Never raises."""
    try:
        data = decode_json(raw, kind, max_bytes)
    except ProtocolError:
        return None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= 256 else None


def _load_json(raw: bytes | str | Mapping[str, Any], kind: str, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        data = dict(raw)
    else:
        data = decode_json(raw, kind, max_bytes)
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind} message must be a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ProtocolError(f"{kind} message has schema {schema!r}; this side speaks schema {SCHEMA}: upgrade the older side")
    return data


def _json_type_ok(annotation: str, value: Any) -> bool:
    """Whether a decoded JSON value fits a field's annotation (as written in this module: str, int,
    float, bool, Mapping[...], tuple[...], unions with None). Unknown annotations accept anything."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            ok = value is None
        elif part == "str":
            ok = isinstance(value, str)
        elif part == "bool":
            ok = isinstance(value, bool)
        elif part == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif part == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif part.startswith("Mapping["):
            ok = isinstance(value, dict)
        elif part.startswith("tuple[str"):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        elif part.startswith("tuple["):
            ok = isinstance(value, (list, tuple))
        else:
            ok = True
        if ok:
            return True
    return False


def _check_types(cls_fields: tuple[Field[Any], ...], kwargs: Mapping[str, Any], kind: str) -> None:
    for f in cls_fields:
        if f.name in kwargs and isinstance(f.type, str) and not _json_type_ok(f.type, kwargs[f.name]):
            raise ProtocolError(f"{kind} message is malformed: {f.name} must be {f.type}, "
                                f"not {type(kwargs[f.name]).__name__}")


class _Message:
    """Mixin: JSON encoding with the schema version, strict decoding of known fields."""

    KIND = "message"
    REQUIRED: tuple[str, ...] = ()
    MAX_BYTES = MAX_MESSAGE_BYTES  # refused before parsing when larger

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        data["schema"] = SCHEMA
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes | str | Mapping[str, Any]) -> Self:
        data = _load_json(raw, cls.KIND, cls.MAX_BYTES)
        missing = [name for name in cls.REQUIRED if name not in data]
        if missing:
            raise ProtocolError(f"{cls.KIND} message lacks field(s) {', '.join(missing)}")
        cls_fields = fields(cls)  # type: ignore[arg-type]  # subclasses are dataclasses
        known = {f.name for f in cls_fields}
        kwargs = {k: v for k, v in data.items() if k in known}  # unknown fields: ignored (forward compatible)
        _check_types(cls_fields, kwargs, cls.KIND)
        try:
            obj = cls(**kwargs)
            obj._validate()
        except (TypeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"{cls.KIND} message is malformed: {exc}") from exc
        return obj

    def _validate(self) -> None:  # overridden where there is something to check
        return None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


DEVICE_STATES = ("online", "offline")


@dataclass(frozen=True)
class DeviceStatus(_Message):
    """Retained on ``up/status``; the last will publishes the same with state "offline"."""

    KIND = "status"
    REQUIRED = ("device_id", "state")
    MAX_BYTES = 16 * 1024
    device_id: str
    state: str  # "online" | "offline"
    active_artifact_id: str | None = None
    active_model: str | None = None  # "name@version"
    previous_artifact_id: str | None = None
    profile: str | None = None
    agent_version: str | None = None
    load: Mapping[str, Any] = field(default_factory=dict)  # current slowdown/cpu-burn settings
    ts: float = 0.0

    def _validate(self) -> None:
        _require(self.state in DEVICE_STATES, f"state must be one of {DEVICE_STATES}")
        validate_device_id(self.device_id)


@dataclass(frozen=True)
class Hello(_Message):
    """Sent on every (re)connect: what the device is and can run."""

    KIND = "hello"
    REQUIRED = ("device_id", "agent_version")
    MAX_BYTES = 16 * 1024
    device_id: str
    agent_version: str
    profile: str | None = None
    machine: str = ""
    runtimes: tuple[str, ...] = ()
    execution_providers: tuple[str, ...] = ()  # known once a runtime is loaded (empty before the first model)
    active_artifact_id: str | None = None
    free_disk_bytes: int | None = None
    ts: float = 0.0
    incarnation: str | None = None  # the telemetry outbox's incarnation (host answers with a TelemetryAck)

    def _validate(self) -> None:
        validate_device_id(self.device_id)
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        object.__setattr__(self, "execution_providers", tuple(self.execution_providers))


@dataclass(frozen=True)
class DesiredDeployment(_Message):
    """Retained on ``down/desired``: the artifact a device must run. The manifest and its signature
    travel inline, so the device verifies the signature before it asks for a single byte.

    An empty retained payload clears the desired deployment (the device keeps what it runs).
    """

    KIND = "desired"
    REQUIRED = ("deployment_id", "artifact_id", "manifest", "signature")
    MAX_BYTES = 1024 * 1024  # the manifest and signature travel inline
    deployment_id: str
    artifact_id: str
    manifest: Mapping[str, Any]  # the manifest.json object
    signature: Mapping[str, Any]  # the manifest.sig object
    ts: float = 0.0

    def _validate(self) -> None:
        _require(isinstance(self.manifest, Mapping), "manifest must be an object")
        _require(isinstance(self.signature, Mapping), "signature must be an object")
        _require(self.manifest.get("artifact_id") == self.artifact_id, "artifact_id differs from the manifest's")

    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class ChunkRequest(_Message):
    """``up/chunkreq``: send chunks [start_index, start_index + count) of one payload's zstd stream.

    ``request_id`` is unique per request message: a server answers each id once (a broker may deliver
    a message twice to a client whose subscriptions overlap)."""

    KIND = "chunkreq"
    REQUIRED = ("request_id", "artifact_id", "payload", "start_index", "count")
    MAX_BYTES = 4096
    request_id: str
    artifact_id: str
    payload: str  # a payload name from the manifest
    start_index: int
    count: int

    def _validate(self) -> None:
        _require(isinstance(self.start_index, int) and self.start_index >= 0, "start_index must be an integer >= 0")
        _require(isinstance(self.count, int) and 1 <= self.count <= 256, "count must be an integer in 1..256")


TRANSFER_STATES = ("verifying", "downloading", "installing", "active", "failed", "rolled_back", "rejected")


@dataclass(frozen=True)
class TransferProgress(_Message):
    """``up/progress``: where a deployment stands; "active", "failed", "rejected" are final."""

    KIND = "progress"
    REQUIRED = ("deployment_id", "artifact_id", "state")
    MAX_BYTES = 16 * 1024
    deployment_id: str
    artifact_id: str
    state: str
    bytes_done: int = 0
    bytes_total: int = 0
    percent: float = 0.0
    error: str | None = None
    ts: float = 0.0

    def _validate(self) -> None:
        _require(self.state in TRANSFER_STATES, f"state must be one of {TRANSFER_STATES}")


@dataclass(frozen=True)
class TelemetryReport(_Message):
    """``up/telemetry``. ``seq`` increases by one per report within an ``incarnation`` (a random id
    the agent makes with a new outbox: a wiped data dir is a new incarnation, starting at seq 0), so
    the host can order, deduplicate and detect gaps per (device, incarnation). The host acknowledges
    stored seqs with a ``TelemetryAck``; the device keeps each report until then. Power is ``None``
    when not measured, never 0. ``incarnation`` None: an agent that predates acks.
    """

    KIND = "telemetry"
    REQUIRED = ("device_id", "seq", "ts", "event")
    device_id: str
    seq: int
    ts: float
    event: str  # "periodic" | "benchmark" | "install" | "rollback" | "error" | "trial"
    artifact_id: str | None = None  # the active model's artifact
    model: str | None = None  # "name@version" of the active model
    window_s: float = 0.0  # the field window ends at ``ts``
    requests: int = 0  # real (local endpoint) requests in the window, errors included
    errors: int = 0
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # p50, p90, p95, p99, mean of the window's requests
    cpu_percent: float | None = None
    memory_rss_bytes: int | None = None
    memory_available_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_source: str = "not measured"
    benchmark: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    incarnation: str | None = None

    def _validate(self) -> None:
        _require(isinstance(self.seq, int) and self.seq >= 0, "seq must be an integer >= 0")
        _require(self.incarnation is None or _valid_incarnation(self.incarnation),
                 "incarnation must be 1-64 letters, digits, '-' or '_'")


_INCARNATION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ACK_RANGES = 256


def _valid_incarnation(value: Any) -> bool:
    return isinstance(value, str) and bool(_INCARNATION_RE.match(value))


@dataclass(frozen=True)
class TelemetryAck(_Message):
    """``down/ack``: the host has *stored* these seqs of this incarnation (inclusive ``[first, last]``
    ranges, ascending); the device may delete them from its outbox. An ack with no ranges (sent in
    answer to a hello) only says "this host acknowledges telemetry". An ack of another incarnation
    is ignored. See docs/protocol.md, "Telemetry delivery"."""

    KIND = "ack"
    REQUIRED = ("incarnation", "ranges")
    MAX_BYTES = 16 * 1024
    incarnation: str
    ranges: tuple[tuple[int, int], ...]
    ts: float = 0.0

    def _validate(self) -> None:
        _require(_valid_incarnation(self.incarnation), "incarnation must be 1-64 letters, digits, '-' or '_'")
        _require(isinstance(self.ranges, (list, tuple)) and len(self.ranges) <= MAX_ACK_RANGES,
                 f"ranges must be a list of at most {MAX_ACK_RANGES} [first, last] pairs")
        ranges = []
        for pair in self.ranges:
            _require(isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_int(v) and v >= 0 for v in pair)
                     and pair[0] <= pair[1], "each range must be [first, last] with 0 <= first <= last")
            ranges.append((int(pair[0]), int(pair[1])))
        object.__setattr__(self, "ranges", tuple(ranges))

    def covers(self, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self.ranges)

    def count(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)


def seq_ranges(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged inclusive ranges of a set of seqs: [0, 1, 2, 5] -> ((0, 2), (5, 5))."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class Command(_Message):
    """``down/cmd``: ``args`` is the JSON object of the command's typed arguments (``COMMAND_ARGS``:
    ``BenchmarkArgs``, ``RollbackArgs``, ``StatusArgs``, ``SetTelemetryIntervalArgs``,
    ``SetLoadArgs``, ``TrialRequest``); build one with ``Command.of`` and read it with ``parsed_args``."""

    KIND = "cmd"
    REQUIRED = ("request_id", "command")
    MAX_BYTES = 1024 * 1024  # a trial carries a manifest inline
    request_id: str
    command: str
    args: Mapping[str, Any] = field(default_factory=dict)
    ts: float = 0.0

    def _validate(self) -> None:
        _require(self.command in COMMANDS, f"command must be one of {COMMANDS}")
        _require(isinstance(self.args, Mapping), "args must be an object")

    @classmethod
    def of(cls, request_id: str, args: "CommandArgs", ts: float = 0.0) -> "Command":
        return cls(request_id=request_id, command=args.COMMAND, args=args.to_payload(), ts=ts)

    def parsed_args(self) -> "CommandArgs":
        """The typed arguments; ProtocolError when they do not fit the command."""
        args: CommandArgs = COMMAND_ARGS[self.command].from_payload(self.args)
        return args


@dataclass(frozen=True)
class CommandReply(_Message):
    """``up/reply``: carries the command's request_id."""

    KIND = "reply"
    REQUIRED = ("request_id", "command", "ok")
    MAX_BYTES = 1024 * 1024
    request_id: str
    command: str
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    ts: float = 0.0


# ---------------------------------------------------------------------------------------------
# Command arguments: one frozen dataclass per command, the ``args`` object of its ``Command``


_Args = TypeVar("_Args", bound="CommandArgs")


class CommandArgs(_Message):
    """Base of the typed arguments of one command. ``to_payload`` is the ``Command.args`` object
    (no ``schema`` field: the command carries it; optional fields left at None are omitted, as the
    host always sent them); ``from_payload`` validates and raises ProtocolError."""

    COMMAND = ""

    def to_payload(self) -> dict[str, Any]:
        try:
            self._validate()
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.KIND} arguments are malformed: {exc}") from exc
        data = self.to_dict()
        data.pop("schema")
        return {k: v for k, v in data.items() if v is not None or k in self.REQUIRED}

    @classmethod
    def from_payload(cls: type[_Args], payload: Mapping[str, Any]) -> _Args:
        if not isinstance(payload, Mapping):
            raise ProtocolError(f"{cls.KIND} arguments must be an object")
        args: _Args = cls.from_json({**dict(payload), "schema": SCHEMA})
        return args


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class StatusArgs(CommandArgs):
    """``status``: no arguments; the reply's result is the device status plus runtime details."""

    KIND = COMMAND = "status"


@dataclass(frozen=True)
class BenchmarkArgs(CommandArgs):
    """``benchmark``: time the active model (``warmup`` untimed runs first)."""

    KIND = COMMAND = "benchmark"
    runs: int = 50
    warmup: int = 5

    def _validate(self) -> None:
        _require(_is_int(self.runs) and self.runs >= 1, "runs must be an integer >= 1")
        _require(_is_int(self.warmup) and self.warmup >= 0, "warmup must be an integer >= 0")


@dataclass(frozen=True)
class RollbackArgs(CommandArgs):
    """``rollback``: switch back to the previous slot; ``reason`` goes into telemetry and progress."""

    KIND = COMMAND = "rollback"
    reason: str = "rollback command"

    def _validate(self) -> None:
        _require(isinstance(self.reason, str), "reason must be a string")


@dataclass(frozen=True)
class SetTelemetryIntervalArgs(CommandArgs):
    """``set_telemetry_interval``: the periodic report interval, applied at once."""

    KIND = COMMAND = "set_telemetry_interval"
    REQUIRED = ("seconds",)
    seconds: float

    def _validate(self) -> None:
        _require(_is_number(self.seconds) and self.seconds > 0, "seconds must be a number > 0")


@dataclass(frozen=True)
class SetLoadArgs(CommandArgs):
    """``set_load``: artificial load (tests, demos); a field left out keeps the device's current
    value. The agent's ``LoadController`` checks the ranges (slowdown >= 1, duty 0..1, threads 0..64)."""

    KIND = COMMAND = "set_load"
    slowdown_factor: float | None = None
    cpu_burn_threads: int | None = None
    cpu_burn_duty: float | None = None

    def _validate(self) -> None:
        _require(self.slowdown_factor is None or _is_number(self.slowdown_factor), "slowdown_factor must be a number")
        _require(self.cpu_burn_threads is None or _is_int(self.cpu_burn_threads), "cpu_burn_threads must be an integer")
        _require(self.cpu_burn_duty is None or _is_number(self.cpu_burn_duty), "cpu_burn_duty must be a number")


MAX_TRIAL_RUNS = 10_000
MAX_TRIAL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class TrialRequest(CommandArgs):
    """The ``args`` of a ``trial`` command: benchmark a signed artifact WITHOUT installing it.

    Added within v1 (an older agent answers the unknown command with ``ok: false``). The manifest
    and signature travel inline as in ``DesiredDeployment``; the device verifies them, pulls the
    payloads with the usual chunk requests into a scratch folder (never its A/B slots), loads and
    benchmarks the model, replies, and deletes the folder. ``timeout_s`` is how long the host
    waits: the device abandons a trial still transferring after it (a vanished host cannot pin
    the device's one trial slot). One trial at a time: a second is refused with
    ``result.busy = true``.
    """

    KIND = COMMAND = "trial"
    REQUIRED = ("artifact_id", "manifest", "signature")
    artifact_id: str
    manifest: Mapping[str, Any]
    signature: Mapping[str, Any]
    runs: int = 50
    warmup: int = 5
    timeout_s: float = 300.0

    def _validate(self) -> None:
        _require(isinstance(self.manifest, Mapping), "manifest must be an object")
        _require(isinstance(self.signature, Mapping), "signature must be an object")
        _require(self.manifest.get("artifact_id") == self.artifact_id, "artifact_id differs from the manifest's")
        _require(isinstance(self.runs, int) and 1 <= self.runs <= MAX_TRIAL_RUNS, f"runs must be an integer in 1..{MAX_TRIAL_RUNS}")
        _require(isinstance(self.warmup, int) and 0 <= self.warmup <= 1000, "warmup must be an integer in 0..1000")
        _require(isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= MAX_TRIAL_TIMEOUT_S,
                 f"timeout_s must be in (0, {MAX_TRIAL_TIMEOUT_S:g}]")

    def as_desired(self, deployment_id: str) -> DesiredDeployment:
        """The same artifact as a deployment message, for the shared verify-and-pull code."""
        return DesiredDeployment(deployment_id=deployment_id, artifact_id=self.artifact_id, manifest=self.manifest,
                                 signature=self.signature, ts=now_s())


COMMAND_ARGS: dict[str, type[CommandArgs]] = {
    args.COMMAND: args for args in (BenchmarkArgs, RollbackArgs, StatusArgs, SetTelemetryIntervalArgs, SetLoadArgs,
                                    TrialRequest)}
COMMANDS = tuple(COMMAND_ARGS)


# ---------------------------------------------------------------------------------------------
# Binary chunk frames (``down/chunks``)
#
#   b"EFC1" | uint32 big-endian header length N | N bytes of UTF-8 JSON header | chunk bytes
#
# The header is a ChunkHeader. Chunks are slices of the payload's zstd stream; ``sha256`` covers the
# chunk bytes. A frame with ``error`` set carries no bytes (unknown artifact or payload).


@dataclass(frozen=True)
class ChunkHeader(_Message):
    KIND = "chunk"
    MAX_BYTES = MAX_CHUNK_HEADER_BYTES
    REQUIRED = ("request_id", "artifact_id", "payload", "index", "chunk_count", "offset", "compressed_size", "sha256")
    request_id: str
    artifact_id: str
    payload: str
    index: int
    chunk_count: int
    offset: int  # byte offset of this chunk in the compressed stream
    compressed_size: int  # size of the whole compressed stream
    sha256: str  # of this chunk's bytes
    chunk_bytes: int = MAX_CHUNK_BYTES  # nominal chunk size: every chunk but the last has this size
    stream_sha256: str = ""  # of the whole compressed stream: a resumed download checks it is the same stream
    compression: str = "zstd"
    error: str | None = None

    def _validate(self) -> None:
        _require(self.compression == "zstd", "only zstd compression is defined")
        if self.error is None:
            _require(0 <= self.index < self.chunk_count, "index out of range")
            _require(0 < self.chunk_bytes <= 128 * 1024, "chunk_bytes must be in 1..131072")


@dataclass(frozen=True)
class ChunkFrame:
    header: ChunkHeader
    data: bytes | memoryview

    def verify(self) -> None:
        """Raise ProtocolError unless the bytes match the header's length and sha256."""
        h = self.header
        expected_len = min(h.chunk_bytes, h.compressed_size - h.offset)
        if len(self.data) != expected_len:
            raise ProtocolError(f"chunk {h.index} of {h.payload} has {len(self.data)} bytes, expected {expected_len}")
        if hashlib.sha256(self.data).hexdigest() != h.sha256:
            raise ProtocolError(f"chunk {h.index} of {h.payload} fails its sha256 check")


def encode_chunk_frame(header: ChunkHeader, data: bytes) -> bytes:
    head = header.to_json()
    return CHUNK_MAGIC + struct.pack(">I", len(head)) + head + data


def decode_chunk_frame(frame: bytes) -> ChunkFrame:
    if len(frame) < 8 or frame[:4] != CHUNK_MAGIC:
        raise ProtocolError("chunk frame lacks the EFC1 magic")
    (head_len,) = struct.unpack(">I", frame[4:8])
    if len(frame) > MAX_CHUNK_HEADER_BYTES + 8 + 128 * 1024:
        raise ProtocolError(f"chunk frame of {len(frame)} bytes exceeds the largest chunk")
    if head_len > MAX_CHUNK_HEADER_BYTES or 8 + head_len > len(frame):
        raise ProtocolError("chunk frame header length is invalid")
    header = ChunkHeader.from_json(bytes(frame[8:8 + head_len]))
    return ChunkFrame(header=header, data=memoryview(frame)[8 + head_len:])  # no copy of the chunk bytes
