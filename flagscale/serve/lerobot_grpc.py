"""lerobot's async inference over gRPC (`transport.AsyncInference`, lerobot 0.4.x), so that
lerobot's stock `RobotClient` drives a robot from this server unchanged.

    python -m lerobot.async_inference.robot_client --server_address <host>:8080 \\
        --policy_type pi0 --pretrained_name_or_path lerobot/pi0 --actions_per_chunk 50 ...

Per robot (gRPC peer): `Ready` starts its state afresh; `SendPolicyInstructions` is checked
against the served model (policy type, feature names, actions_per_chunk, rename_map) and never
loads anything; `SendObservations` (chunked stream) keeps the newest qualifying observation
(lerobot's rules: `must_go`, first, or a timestep not predicted yet and a joint-space distance >= 1
from the last one run); `GetActions` waits up to `obs_queue_timeout_s` for it (none: an empty
reply, the client asks again), runs it through the shared inference worker (so robots are batched
with each other and with HTTP / websocket requests) and answers `TimedAction`s stamped as lerobot's
server stamps them. Payloads are read by lerobot_pickle's restricted unpickler. grpcio is imported
only when `engine.lerobot_grpc.enabled` is true.
"""

import collections
import dataclasses
import functools
import io
import threading
import time

from types import SimpleNamespace

import numpy as np

from flagscale.logger import get_logger
from flagscale.serve import lerobot_pickle, wire
from flagscale.serve.auth import UNAUTHORIZED, authorized
from flagscale.serve.config import IMAGE_SLOTS, ServeConfig
from flagscale.serve.errors import RequestError
from flagscale.serve.lerobot_pickle import PayloadError, RemotePolicyConfig, TimedObservation
from flagscale.serve.limits import check_prompt_length
from flagscale.serve.service import infer_blocking
from flagscale.serve.worker import NotReady, QueueFull

logger = get_logger("flagscale.serve.lerobot_grpc")

SERVICE = "transport.AsyncInference"
ENDPOINT = "lerobot"
STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."
POLICY_TYPES = {"pi0": "pi0", "pi0.5": "pi05"}  # served model variant -> lerobot's policy_type
BEGIN, MIDDLE, END = 1, 2, 3  # transport.TransferState
CHUNK_LIMIT = 4 * 1024 * 1024 + 64 * 1024  # lerobot sends <= 2 MiB pieces, caps messages at 4 MiB
MAX_PREDICTED = 10_000  # remembered predicted timesteps per robot


class Refusal(Exception):
    """An RPC refused with a gRPC status code name and a message for the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------- wire messages


@functools.lru_cache(maxsize=1)
def messages() -> SimpleNamespace:
    """lerobot's transport messages, built from a descriptor at run time in a private pool (no
    generated code, no clash with lerobot's own `transport.*` in the default pool)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="flagscale/lerobot_transport.proto", package="transport", syntax="proto3"
    )
    enum = proto.enum_type.add(name="TransferState")
    for number, name in enumerate(("UNKNOWN", "BEGIN", "MIDDLE", "END")):
        enum.value.add(name=f"TRANSFER_{name}", number=number)
    fields = {
        "Observation": [("transfer_state", 1, F.TYPE_ENUM), ("data", 2, F.TYPE_BYTES)],
        "Actions": [("data", 1, F.TYPE_BYTES)],
        "PolicySetup": [("data", 1, F.TYPE_BYTES)],
        "Empty": [],
    }
    for message, items in fields.items():
        desc = proto.message_type.add(name=message)
        for name, number, kind in items:
            field = desc.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
            if kind == F.TYPE_ENUM:
                field.type_name = ".transport.TransferState"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return SimpleNamespace(
        **{
            name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"transport.{name}"))
            for name in fields
        }
    )


# ---------------------------------------------------------------- policy instructions


@dataclasses.dataclass
class Setup:
    """A robot's checked RemotePolicyConfig."""

    state_names: list  # joint keys of the raw observation, in state order
    cameras: dict  # raw observation key -> model image slot
    actions_per_chunk: int


def check_setup(spec: RemotePolicyConfig, cfg: ServeConfig, served_type: str) -> Setup:
    """RemotePolicyConfig vs the served model (lerobot policy_type `served_type`); Refusal
    (INVALID_ARGUMENT) naming the field."""
    _expect(isinstance(spec.policy_type, str), "policy_type: expected a string")
    if spec.policy_type != served_type:
        raise _invalid(
            f"policy_type {spec.policy_type!r}: this server serves {served_type} "
            "(it never loads the model a client names)"
        )
    for name in ("pretrained_name_or_path", "device"):
        _expect(isinstance(getattr(spec, name), str), f"{name}: expected a string")
    chunk = spec.actions_per_chunk
    _expect(type(chunk) is int, "actions_per_chunk: expected an integer")
    if not 1 <= chunk <= cfg.action_horizon:
        raise _invalid(
            f"actions_per_chunk {chunk}: must be 1..{cfg.action_horizon} "
            "(the served chunk, engine.action_horizon)"
        )
    rename = spec.rename_map
    _expect(
        isinstance(rename, dict) and all(isinstance(x, str) for kv in rename.items() for x in kv),
        "rename_map: expected a mapping of strings",
    )
    _expect(isinstance(spec.lerobot_features, dict), "lerobot_features: expected a mapping")
    state, cameras = None, {}
    for key, feature in spec.lerobot_features.items():
        _expect(isinstance(key, str) and isinstance(feature, dict), "lerobot_features: dicts only")
        target = rename.get(key, key)
        if target == STATE_KEY:
            state = _state_names(key, feature, cfg)
        elif key.startswith(IMAGE_PREFIX):
            camera = key.removeprefix(IMAGE_PREFIX)
            cameras[camera] = _slot(key, target, feature, cfg)
        else:
            raise _invalid(
                f"lerobot_features.{key}: not an input of the served Pi0 "
                f"({STATE_KEY} and {IMAGE_PREFIX}<camera> only)"
            )
    _expect(state is not None, f"lerobot_features: no {STATE_KEY}")
    _expect(bool(cameras), f"lerobot_features: no {IMAGE_PREFIX}<camera>")
    slots = list(cameras.values())
    duplicated = {s for s in slots if slots.count(s) > 1}
    _expect(not duplicated, f"lerobot_features: several cameras feed {sorted(duplicated)}")
    return Setup(state, cameras, chunk)


def _state_names(key: str, feature: dict, cfg: ServeConfig) -> list:
    names = feature.get("names")
    ok = isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    _expect(ok, f"lerobot_features.{key}.names: expected a list of joint keys")
    if len(names) != cfg.state_dim:
        raise _invalid(
            f"lerobot_features.{key}: {len(names)} joints, the served model takes "
            f"{cfg.state_dim} (engine.state_dim)"
        )
    return list(names)


def _slot(key: str, target: str, feature: dict, cfg: ServeConfig) -> str:
    shape = feature.get("shape")
    ok = isinstance(shape, (tuple, list)) and len(shape) == 3 and shape[-1] == 3
    _expect(
        ok and feature.get("dtype") in ("image", "video"),
        f"lerobot_features.{key}: not an HWC image",
    )
    camera = key.removeprefix(IMAGE_PREFIX)
    slot = target.removeprefix(IMAGE_PREFIX)
    if target.startswith(IMAGE_PREFIX) and slot in IMAGE_SLOTS:
        return slot
    mapping = {**cfg.cameras, **cfg.lerobot_grpc.cameras}
    if camera in mapping:
        return mapping[camera]
    raise _invalid(
        f"lerobot_features.{key}: no image slot for camera {camera!r}; map it in "
        f"serve.engine.lerobot_grpc.cameras (e.g. {{{camera}: base_0_rgb}}; slots: "
        f"{', '.join(IMAGE_SLOTS)}) or name it {IMAGE_PREFIX}<slot> in rename_map"
    )


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _invalid(message)


def _invalid(message: str) -> Refusal:
    return Refusal("INVALID_ARGUMENT", message)


# ---------------------------------------------------------------- observations


def to_observation(timed: TimedObservation, setup: Setup, cfg: ServeConfig) -> dict:
    """A TimedObservation's raw robot observation -> the policy's {"images", "state", "prompt"}."""
    _expect(isinstance(timed.observation, dict), "observation: expected a mapping")
    _expect(type(timed.timestep) is int and timed.timestep >= 0, "timestep: expected an int >= 0")
    _expect(_finite_number(timed.timestamp), "timestamp: expected a finite number")
    _expect(isinstance(timed.must_go, bool), "must_go: expected a bool")
    raw = timed.observation
    state = np.empty(len(setup.state_names), np.float32)
    for i, name in enumerate(setup.state_names):
        value = raw.get(name)
        _expect(_finite_number(value), f"observation.{name}: expected a finite number")
        state[i] = float(value)
    images = {}
    for camera, slot in setup.cameras.items():
        _expect(camera in raw, f"observation.{camera}: missing camera frame")
        try:
            images[slot] = wire.to_hwc_uint8(camera, _as_array(raw[camera]), cfg.max_image_side)
        except RequestError as e:
            raise _invalid(f"observation.{e.message}") from None
    task = raw.get("task", cfg.instruction)
    _expect(isinstance(task, str), "observation.task: expected a string")
    try:
        check_prompt_length("observation.task", task, cfg)
    except RequestError as e:
        raise _invalid(e.message) from None
    return {"images": images, "state": state, "prompt": task}


def _finite_number(value) -> bool:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        return False
    return bool(np.isfinite(float(value)))


def _as_array(value):
    if not isinstance(value, np.ndarray) and hasattr(value, "numpy"):  # a torch tensor
        return value.numpy()
    return value


def assemble(chunks, limit: int) -> bytes:
    """lerobot's send_bytes_in_chunks stream -> one payload (BEGIN resets, END completes)."""
    buffer, size = io.BytesIO(), 0
    for chunk in chunks:
        if chunk.transfer_state not in (BEGIN, MIDDLE, END):
            raise _invalid(f"transfer_state {chunk.transfer_state}: expected BEGIN, MIDDLE or END")
        if chunk.transfer_state == BEGIN:
            buffer, size = io.BytesIO(), 0
        size += len(chunk.data)
        if size > limit:
            raise _invalid(
                f"observation larger than {limit / 2**20:g} MB (engine.lerobot_grpc.max_message_mb)"
            )
        buffer.write(chunk.data)
        if chunk.transfer_state == END:
            return buffer.getvalue()
    raise _invalid("the observation stream ended without a TRANSFER_END message")


def similar(state: np.ndarray, previous: np.ndarray) -> bool:
    """lerobot's observations_similar: joint-space distance below 1."""
    return bool(np.linalg.norm(state - previous) < 1.0)


# ---------------------------------------------------------------- per-robot state


@dataclasses.dataclass
class Robot:
    setup: Setup | None = None
    pending: tuple | None = None  # (TimedObservation, policy observation), newest wins
    predicted: set = dataclasses.field(default_factory=set)
    last_state: np.ndarray | None = None
    cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)

    def offer(self, timed: TimedObservation, obs: dict) -> bool:
        """Queue the observation if lerobot's server would; True if queued."""
        with self.cond:
            keep = (
                timed.must_go
                or self.last_state is None
                or (
                    timed.timestep not in self.predicted
                    and not similar(obs["state"], self.last_state)
                )
            )
            if keep:
                self.pending = (timed, obs)
                self.cond.notify_all()
            return keep

    def take(self, timeout: float) -> tuple | None:
        """The queued observation (waiting up to `timeout`), marked as predicted."""
        with self.cond:
            self.cond.wait_for(lambda: self.pending is not None, timeout)
            item, self.pending = self.pending, None
            if item is not None:
                self.predicted.add(item[0].timestep)
                if len(self.predicted) > MAX_PREDICTED:
                    self.predicted = set(sorted(self.predicted)[MAX_PREDICTED // 2 :])
                self.last_state = item[1]["state"]
            return item


class Robots:
    """Robot state by gRPC peer, at most `limit` (the least recently used is dropped)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._robots = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, peer: str, fresh: bool = False) -> Robot:
        with self._lock:
            robot = None if fresh else self._robots.get(peer)
            if robot is None:
                robot = self._robots[peer] = Robot()
            self._robots.move_to_end(peer)
            while len(self._robots) > self.limit:
                dropped, _ = self._robots.popitem(last=False)
                logger.info(
                    "lerobot: dropped the state of %s (engine.lerobot_grpc.max_robots)", dropped
                )
            return robot

    def __len__(self) -> int:
        return len(self._robots)


# ---------------------------------------------------------------- the service


class LerobotService:
    """transport.AsyncInference on the app's `service.ServeState` (cfg, worker, keys, metrics)."""

    def __init__(self, state):
        self.state = state
        self.cfg: ServeConfig = state.cfg
        self.robots = Robots(self.cfg.lerobot_grpc.max_robots)
        self.msg = messages()

    def ready(self, request, context):
        if self.robots.get(context.peer()).setup is not None:
            logger.warning(
                "lerobot: Ready again from %s: its state starts afresh (robots are told apart by "
                "connection; two RobotClients in one process share one: run one per process)",
                context.peer(),
            )
        self.robots.get(context.peer(), fresh=True)
        logger.info("lerobot: robot %s ready", context.peer())
        return self.msg.Empty()

    def send_policy_instructions(self, request, context):
        spec = _payload(request.data, RemotePolicyConfig)
        policy = self.state.worker.policy
        if policy is None:
            raise Refusal("UNAVAILABLE", "the model is not loaded yet; retry")
        served = POLICY_TYPES[policy.metadata.get("model_variant", "pi0")]
        setup = check_setup(spec, self.cfg, served)
        self.robots.get(context.peer()).setup = setup
        logger.info(
            "lerobot: robot %s: %s, %d actions per chunk, cameras %s (asked for %r; serving %s)",
            context.peer(),
            spec.policy_type,
            setup.actions_per_chunk,
            setup.cameras,
            spec.pretrained_name_or_path,
            self.cfg.model or "random weights",
        )
        return self.msg.Empty()

    def send_observations(self, request_iterator, context):
        limit = int(self.cfg.lerobot_grpc.max_message_mb * 2**20)
        timed = _payload(assemble(request_iterator, limit), TimedObservation)
        robot = self.robots.get(context.peer())
        if robot.setup is None:
            raise Refusal("FAILED_PRECONDITION", "call SendPolicyInstructions first")
        robot.offer(timed, to_observation(timed, robot.setup, self.cfg))
        return self.msg.Empty()

    def get_actions(self, request, context):
        robot = self.robots.get(context.peer())
        if robot.setup is None:
            raise Refusal("FAILED_PRECONDITION", "call SendPolicyInstructions first")
        item = robot.take(self.cfg.lerobot_grpc.obs_queue_timeout_s)
        if item is None:  # lerobot's answer when no observation came: empty, ask again
            return self.msg.Actions()
        timed, obs = item
        actions = self._infer(obs)[: robot.setup.actions_per_chunk]
        return self.msg.Actions(data=lerobot_pickle.dumps_actions(self._timed(timed, actions)))

    def _infer(self, obs: dict) -> np.ndarray:
        self.state.codecs.warm_prompts([obs["prompt"]])  # tokenized here, not by the model thread
        batch = wire.one_observation(
            obs, self.cfg.num_steps, None, self.cfg, self.state.fixed_noise
        )
        try:
            result = infer_blocking(self.state, batch)
        except (NotReady, QueueFull) as e:  # not loaded, busy, or shutting down
            raise Refusal("UNAVAILABLE", str(e)) from None
        except TimeoutError:
            raise Refusal(
                "DEADLINE_EXCEEDED", f"no result after {self.cfg.infer_timeout_s:g} s"
            ) from None
        except RequestError as e:  # the model's output cannot be cut
            raise Refusal("INTERNAL", e.message) from None
        except Exception as e:  # as POST /infer words it
            raise Refusal("INTERNAL", f"inference failed: {type(e).__name__}: {e}") from None
        return result.actions[0].astype(np.float32)

    def _timed(self, timed: TimedObservation, actions: np.ndarray) -> list:
        import torch

        dt = 1.0 / self.cfg.lerobot_grpc.fps
        return [  # one tensor per row: a view would pickle the whole chunk's storage every time
            lerobot_pickle.TimedAction(
                timestamp=float(timed.timestamp) + i * dt,
                timestep=timed.timestep + i,
                action=torch.from_numpy(row.copy()),
            )
            for i, row in enumerate(actions)
        ]


def _payload(data: bytes, expected: type):
    try:
        return lerobot_pickle.loads(data, expected)
    except PayloadError as e:
        raise _invalid(f"{expected.__name__}: {e}") from None


def _handler(service: LerobotService, method, name: str):
    """Auth, metrics and errors around one RPC: a Refusal ends it with its status code, anything
    unexpected with INTERNAL and the exception's type only (details go to the log)."""
    import grpc

    metrics, keys = service.state.metrics, service.state.api_keys

    def call(request, context):
        start = time.monotonic()
        status = 200
        try:
            metadata = dict(context.invocation_metadata() or ())
            if not authorized(metadata.get("authorization"), keys):
                raise Refusal("UNAUTHENTICATED", UNAUTHORIZED)
            return method(request, context)
        except Refusal as e:
            status = _HTTP_STATUS.get(e.code, 400)
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception as e:
            status = 500
            logger.exception("lerobot %s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            metrics.observe_request(ENDPOINT, status, time.monotonic() - start)

    return call


_HTTP_STATUS = {  # for the request metrics
    "INTERNAL": 500,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "FAILED_PRECONDITION": 409,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def _generic_handler(grpc, service: LerobotService):
    msg = service.msg
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_unary_rpc_method_handler
    table = {  # name: (kind, method, request message, reply message)
        "Ready": (unary, service.ready, msg.Empty, msg.Empty),
        "SendPolicyInstructions": (
            unary,
            service.send_policy_instructions,
            msg.PolicySetup,
            msg.Empty,
        ),
        "SendObservations": (stream, service.send_observations, msg.Observation, msg.Empty),
        "GetActions": (unary, service.get_actions, msg.Empty, msg.Actions),
    }
    handlers = {
        name: kind(
            _handler(service, method, name),
            request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString,
        )
        for name, (kind, method, request, reply) in table.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def start(state):
    """Start the gRPC server on the app's ServeState; returns it (call .stop(grace) at shutdown)."""
    try:
        import grpc
    except ImportError:
        raise RuntimeError(
            "serve.engine.lerobot_grpc.enabled needs grpcio: pip install -e '.[lerobot]'"
        ) from None
    from concurrent import futures

    service = LerobotService(state)
    grpc_cfg = state.cfg.lerobot_grpc
    workers = 2 * grpc_cfg.max_robots + 4  # each robot: one GetActions + one SendObservations
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lerobot-grpc"),
        handlers=[_generic_handler(grpc, service)],
        options=[
            ("grpc.max_receive_message_length", CHUNK_LIMIT),
            ("grpc.max_send_message_length", CHUNK_LIMIT),
        ],
        maximum_concurrent_rpcs=workers,
    )
    host = grpc_cfg.host or state.cfg.host
    address = f"[{host}]:{grpc_cfg.port}" if ":" in host else f"{host}:{grpc_cfg.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"serve.engine.lerobot_grpc: cannot bind {address}: {e}") from None
    server.start()
    server.bound_port = port
    logger.info("lerobot async inference (gRPC) on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server
