"""A stand-in robot driven by lerobot's own RobotClient (lerobot 0.4.x), for
test_lerobot_robot_client.py. Run with a Python that has lerobot and grpcio, one process per robot
(two RobotClients in one process share one gRPC connection, so any server sees one robot):

    python tests/serve/lerobot_robots.py --address 127.0.0.1:8080 --index 0 --out robot0.json

The robot returns fixed camera frames and joint positions (seeded by its index) and counts the
actions it executes; the client's incoming action chunks are recorded before lerobot aggregates
them. RobotClient, its gRPC stub, its pickles and its control loop are lerobot's, unchanged.
"""

import argparse
import dataclasses
import importlib.machinery
import json
import sys
import tempfile
import threading
import time
import types

from pathlib import Path

import numpy as np

JOINTS = [
    f"{j}.pos"
    for j in ("shoulder_pan", "shoulder_lift", "elbow", "wrist_flex", "wrist_roll", "gripper")
]
CAMERAS = ("front", "wrist")
HEIGHT, WIDTH = 480, 640


def frames(index: int) -> dict:
    rng = np.random.default_rng(100 + index)
    return {cam: rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for cam in CAMERAS}


def joints(index: int) -> dict:
    values = np.random.default_rng(200 + index).uniform(-50, 50, len(JOINTS))
    return {name: float(v) for name, v in zip(JOINTS, values)}


class _Stub(types.ModuleType):
    """Stands in for modules lerobot imports at import time but these robots never use (cv2 for
    OpenCV cameras, torchvision for image transforms)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {}) if name[:1].isupper() else _stub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _stub(name: str) -> _Stub:
    module = _Stub(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
    return module


def stub_missing(*names):
    for name in names:
        try:
            __import__(name)
        except ImportError:
            _stub(name)


def define_robot():
    from lerobot.robots import Robot, RobotConfig

    @RobotConfig.register_subclass("flagscale_standin")
    @dataclasses.dataclass
    class StandinRobotConfig(RobotConfig):
        index: int = 0

    class StandinRobot(Robot):
        config_class = StandinRobotConfig
        name = "flagscale_standin"

        def __init__(self, config):
            super().__init__(config)
            self.index, self.connected, self.executed = config.index, False, []
            self.frames, self.joints = frames(config.index), joints(config.index)

        @property
        def observation_features(self):
            return {**{j: float for j in JOINTS}, **{c: (HEIGHT, WIDTH, 3) for c in CAMERAS}}

        @property
        def action_features(self):
            return {j: float for j in JOINTS}

        @property
        def is_connected(self):
            return self.connected

        def connect(self, calibrate=True):
            self.connected = True

        @property
        def is_calibrated(self):
            return True

        def calibrate(self):
            pass

        def configure(self):
            pass

        def get_observation(self):
            return {**self.joints, **{c: f.copy() for c, f in self.frames.items()}}

        def send_action(self, action):
            self.executed.append(action)
            return action

        def disconnect(self):
            self.connected = False

    StandinRobot.__module__ = StandinRobotConfig.__module__ = __name__
    globals().update(StandinRobot=StandinRobot, StandinRobotConfig=StandinRobotConfig)
    return StandinRobotConfig


def run(args) -> dict:
    stub_missing(
        "cv2", "torchvision", "torchvision.transforms", "torchvision.transforms.functional"
    )
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient

    config_cls = define_robot()
    calibration = Path(tempfile.mkdtemp(prefix="standin-calibration-"))
    robot = config_cls(id=f"robot{args.index}", calibration_dir=calibration, index=args.index)
    cfg = RobotClientConfig(
        policy_type=args.policy_type,
        pretrained_name_or_path="lerobot/pi0",
        robot=robot,
        actions_per_chunk=args.actions_per_chunk,
        task=f"task {args.index}",
        server_address=args.address,
        fps=args.fps,
    )
    client = RobotClient(cfg)
    received, aggregate = [], client._aggregate_action_queues

    def recording(incoming, aggregate_fn=None):
        received.append([[a.get_timestep(), a.get_action().tolist()] for a in incoming])
        return aggregate(incoming, aggregate_fn)

    client._aggregate_action_queues = recording
    assert client.start(), "RobotClient.start() failed"
    receiver = threading.Thread(target=client.receive_actions, daemon=True)
    receiver.start()
    control = threading.Thread(target=client.control_loop, args=(cfg.task,))
    control.start()
    time.sleep(args.seconds)
    client.shutdown_event.set()
    control.join(30)
    receiver.join(30)
    executed = len(client.robot.executed)
    client.stop()
    return {"received": received, "executed": executed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--index", type=int, default=0, help="robot index: seeds its frames")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--policy-type", default="pi0", help="pi0 | pi05")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--actions-per-chunk", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w") as f:
        json.dump(run(args), f)


if __name__ == "__main__":
    main()
