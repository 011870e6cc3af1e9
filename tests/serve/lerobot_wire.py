"""lerobot async-inference messages built without lerobot (for tests): pickles with lerobot's class
paths (numpy 2 or numpy 1.x module names), the chunked observation stream, a gRPC client."""

import io
import pickle
import time

import grpc
import numpy as np
import torch

from serve_helpers import PolicyWrapper

from flagscale.serve import lerobot_pickle as lp
from flagscale.serve.lerobot_grpc import messages

PATHS = {
    lp.TimedObservation: (lp.HELPERS, "TimedObservation"),
    lp.RemotePolicyConfig: (lp.HELPERS, "RemotePolicyConfig"),
    lp.PolicyFeature: (lp.TYPES, "PolicyFeature"),
    lp.FeatureType: (lp.TYPES, "FeatureType"),
}
CHUNK = 2 * 1024 * 1024  # lerobot.transport.utils.CHUNK_SIZE


class LerobotPickler(pickle._Pickler):
    """Writes the stand-ins under lerobot's names, as lerobot's own pickle.dumps would."""

    def __init__(self, file, numpy1=False):
        super().__init__(file, protocol=4)
        self.numpy1 = numpy1

    def save_global(self, obj, name=None):
        module, qualname = PATHS.get(obj, (None, None))
        if (
            module is None
            and self.numpy1
            and getattr(obj, "__module__", "") == "numpy._core.multiarray"
        ):
            module, qualname = "numpy.core.multiarray", obj.__name__
        if module is None:
            return super().save_global(obj, name)
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps(obj, numpy1=False) -> bytes:
    buffer = io.BytesIO()
    LerobotPickler(buffer, numpy1).dump(obj)
    return buffer.getvalue()


def features(joints, cameras, height=480, width=640) -> dict:
    """lerobot's hw_to_dataset_features(robot.observation_features, "observation", False)."""
    out = {
        "observation.state": {"dtype": "float32", "shape": (len(joints),), "names": list(joints)}
    }
    for cam in cameras:
        out[f"observation.images.{cam}"] = {
            "dtype": "image",
            "shape": (height, width, 3),
            "names": ["height", "width", "channels"],
        }
    return out


def policy_config(joints, cameras, actions_per_chunk=10, policy_type="pi0", **extra):
    return lp.RemotePolicyConfig(
        policy_type, "lerobot/pi0", features(joints, cameras), actions_per_chunk, "cpu", **extra
    )


def observation(
    joints, cameras, state, timestep=0, must_go=True, task="pick", seed=0, size=(480, 640)
):
    rng = np.random.default_rng(seed)
    raw = {name: float(v) for name, v in zip(joints, state)}
    raw.update({cam: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for cam in cameras})
    raw["task"] = task
    return lp.TimedObservation(time.time(), timestep, raw, must_go)


def chunks(payload: bytes):
    """lerobot's send_bytes_in_chunks: one END message up to 2 MiB, else BEGIN, MIDDLE..., END."""
    msg = messages()
    for start in range(0, len(payload), CHUNK):
        if start + CHUNK >= len(payload):
            state = 3
        else:
            state = 1 if start == 0 else 2
        yield msg.Observation(transfer_state=state, data=payload[start : start + CHUNK])


class Client:
    """The four RPCs as lerobot's AsyncInferenceStub calls them (4 MiB message limits)."""

    def __init__(self, address: str, name: str = "robot", metadata=None):
        options = [
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.primary_user_agent", name),  # a connection of its own: its own peer
        ]
        self.channel = grpc.insecure_channel(address, options)
        self.metadata = metadata
        msg = messages()
        base = "/transport.AsyncInference/"

        def method(kind, name, request, reply):
            return getattr(self.channel, kind)(
                base + name,
                request_serializer=request.SerializeToString,
                response_deserializer=reply.FromString,
            )

        self._ready = method("unary_unary", "Ready", msg.Empty, msg.Empty)
        self._setup = method("unary_unary", "SendPolicyInstructions", msg.PolicySetup, msg.Empty)
        self._observe = method("stream_unary", "SendObservations", msg.Observation, msg.Empty)
        self._actions = method("unary_unary", "GetActions", msg.Empty, msg.Actions)

    def ready(self):
        return self._ready(messages().Empty(), metadata=self.metadata, timeout=30)

    def setup(self, config_or_bytes):
        data = config_or_bytes if isinstance(config_or_bytes, bytes) else dumps(config_or_bytes)
        return self._setup(messages().PolicySetup(data=data), metadata=self.metadata, timeout=30)

    def observe(self, obs_or_bytes, numpy1=False):
        data = obs_or_bytes if isinstance(obs_or_bytes, bytes) else dumps(obs_or_bytes, numpy1)
        return self._observe(chunks(data), metadata=self.metadata, timeout=30)

    def actions(self) -> bytes:
        return self._actions(messages().Empty(), metadata=self.metadata, timeout=60).data

    def close(self):
        self.channel.close()


class ReplyUnpickler(pickle.Unpickler):
    """Reads our TimedAction replies here, where lerobot is not installed."""

    def find_class(self, module, name):
        if (module, name) == (lp.HELPERS, "TimedAction"):
            return lp.TimedAction
        return super().find_class(module, name)


def read_actions(data: bytes) -> list:
    return ReplyUnpickler(io.BytesIO(data)).load()


def stack(timed_actions) -> np.ndarray:
    return torch.stack([a.action for a in timed_actions]).numpy()


class RecordingPolicy(PolicyWrapper):
    """A policy that records each model call's batch size (and fails on the prompt "explode")."""

    def __init__(self, policy):
        super().__init__(policy)
        self.batches = []

    def infer_batch(self, observations, *args, **kwargs):
        self.batches.append(len(observations))
        if any(obs["prompt"] == "explode" for obs in observations):
            raise RuntimeError("kaboom")
        return self.policy.infer_batch(observations, *args, **kwargs)


def start_server(policy, cameras: dict, **engine):
    """A real server (uvicorn on loopback) with lerobot_grpc on a free port, 6 joints, seed 0;
    `.address` is the gRPC address, `.recording.batches` the model calls' batch sizes. Stop it
    with `__exit__`."""
    from serve_helpers import LiveServer, serve_cfg

    from flagscale.serve.app import create_app

    grpc_cfg = {"enabled": True, "port": 0, "cameras": cameras}
    cfg = serve_cfg(state_dim=6, action_dim=6, seed=0, lerobot_grpc=grpc_cfg, **engine)
    recording = RecordingPolicy(policy)
    server = LiveServer(create_app(recording, cfg))
    server.__enter__()
    server.wait_ready()
    server.address = f"127.0.0.1:{server.app.state.lerobot_grpc.bound_port}"
    server.recording = recording
    return server
