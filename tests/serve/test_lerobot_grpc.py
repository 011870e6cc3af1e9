"""lerobot async inference over gRPC, with messages built as lerobot's RobotClient builds them (no
lerobot needed): a real server on loopback, actions value-equal to policy.infer, lerobot's queue
semantics, refusals, two robots batched, API keys."""

import threading

import numpy as np
import pytest

from flagscale.serve import lerobot_pickle as lp

grpc = pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")
wire = pytest.importorskip("lerobot_wire")

JOINTS = [
    f"{j}.pos"
    for j in ("shoulder_pan", "shoulder_lift", "elbow", "wrist_flex", "wrist_roll", "gripper")
]
CAMERAS = ["front", "wrist"]
SLOTS = {"front": "base_0_rgb", "wrist": "left_wrist_0_rgb"}
KEY = "k" * 16


@pytest.fixture(scope="module")
def robot_server(policy):
    server = wire.start_server(policy, SLOTS, max_wait_ms=150)
    yield server
    server.__exit__(None, None, None)


@pytest.fixture
def client(robot_server):
    c = wire.Client(robot_server.address)
    yield c
    c.close()


def reference(policy, obs: lp.TimedObservation, cfg, actions_per_chunk: int) -> np.ndarray:
    raw = obs.observation
    policy_obs = {
        "images": {SLOTS[c]: raw[c] for c in CAMERAS},
        "state": np.array([raw[j] for j in JOINTS], np.float32),
        "prompt": raw["task"],
    }
    out = policy.infer(policy_obs, num_steps=cfg.num_steps, seed=cfg.seed)["actions"]
    return np.asarray(out, np.float32)[:actions_per_chunk, : cfg.action_dim]


def state(seed):
    return np.random.default_rng(seed).uniform(-50, 50, len(JOINTS))


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1.x"])
def test_robot_gets_policy_actions(robot_server, client, policy, numpy1):
    assert client.ready() is not None
    client.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=10))
    obs = wire.observation(JOINTS, CAMERAS, state(1), timestep=7, seed=1)
    client.observe(obs, numpy1=numpy1)
    timed = wire.read_actions(client.actions())
    assert [a.timestep for a in timed] == list(range(7, 17))
    stamps = [a.timestamp - obs.timestamp for a in timed]
    np.testing.assert_allclose(stamps, np.arange(10) / 30, atol=1e-6)  # 2e9 s in float64
    assert all(a.action.dtype == lp_torch().float32 and a.action.shape == (6,) for a in timed)
    want = reference(policy, obs, robot_server.app.state.cfg, 10)
    np.testing.assert_array_equal(wire.stack(timed), want)


def lp_torch():
    import torch

    return torch


def test_chunked_observation_and_empty_reply(robot_server, client, policy):
    client.ready()
    client.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=3))
    big = wire.observation(JOINTS, CAMERAS, state(2), seed=2, size=(720, 1024))
    payload = wire.dumps(big)
    assert len(payload) > 2 * wire.CHUNK  # BEGIN, MIDDLE, END
    client.observe(payload)
    want = reference(policy, big, robot_server.app.state.cfg, 3)
    np.testing.assert_array_equal(wire.stack(wire.read_actions(client.actions())), want)
    assert client.actions() == b""  # nothing queued: lerobot's empty reply after the wait


def test_lerobot_queue_semantics():
    """must_go, first observation, predicted-timestep dedupe, similarity, newest wins."""
    from flagscale.serve.lerobot_grpc import Robot

    def offer(robot, timestep, joints, must_go=False):
        timed = lp.TimedObservation(0.0, timestep, {}, must_go)
        return robot.offer(timed, {"state": np.asarray(joints, np.float32)})

    robot = Robot()
    assert offer(robot, 0, [0, 0])  # first
    assert robot.take(0.01)[0].timestep == 0
    assert not offer(robot, 0, [10, 10])  # timestep predicted already
    assert not offer(robot, 1, [0.5, 0.5])  # within distance 1 of the last one run
    assert offer(robot, 1, [0.5, 0.5], must_go=True)
    assert offer(robot, 2, [5, 5])
    assert robot.take(0.01)[0].timestep == 2  # newest wins
    assert robot.take(0.01) is None


def rpc_error(call, *args):
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(
    "config, message",
    [
        (wire.policy_config(JOINTS, CAMERAS, policy_type="pi05"), "policy_type 'pi05'"),
        (wire.policy_config(JOINTS, CAMERAS, policy_type="act"), "this server serves pi0"),
        (wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=51), "actions_per_chunk 51"),
        (wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=0), "must be 1..50"),
        (wire.policy_config(JOINTS[:4], CAMERAS), "4 joints, the served model takes 6"),
        (wire.policy_config(JOINTS, ["top"]), "no image slot for camera 'top'"),
        (wire.policy_config(JOINTS, ["front", "side"], rename_map={}), "camera 'side'"),
        (
            wire.policy_config(
                JOINTS,
                CAMERAS,
                rename_map={"observation.images.wrist": "observation.images.base_0_rgb"},
            ),
            "several cameras feed ['base_0_rgb']",
        ),
        (wire.policy_config(JOINTS, CAMERAS, rename_map={"a": 1}), "rename_map: expected"),
    ],
)
def test_policy_instructions_are_checked(client, config, message):
    client.ready()
    code, details = rpc_error(client.setup, config)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_rename_map_and_extra_features(client, robot_server, policy):
    client.ready()
    spec = wire.policy_config(
        JOINTS,
        ["top", "wrist"],
        rename_map={"observation.images.top": "observation.images.base_0_rgb"},
    )
    client.setup(spec)
    spec.lerobot_features["observation.environment_state"] = {"dtype": "float32", "shape": (3,)}
    code, details = rpc_error(client.setup, spec)
    assert "observation.environment_state: not an input" in details


def test_observation_errors(client):
    client.ready()
    code, details = rpc_error(client.observe, wire.observation(JOINTS, CAMERAS, state(3)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "SendPolicyInstructions" in details
    client.setup(wire.policy_config(JOINTS, CAMERAS))
    missing = wire.observation(JOINTS, CAMERAS, state(3))
    del missing.observation["elbow.pos"]
    assert (
        "observation.elbow.pos: expected a finite number" in rpc_error(client.observe, missing)[1]
    )
    flat = wire.observation(JOINTS, CAMERAS, state(3))
    flat.observation["front"] = np.zeros((4, 4), np.uint8)
    assert "front: expected a 3-D image" in rpc_error(client.observe, flat)[1]
    nan = wire.observation(JOINTS, CAMERAS, [np.nan] * 6)
    assert "expected a finite number" in rpc_error(client.observe, nan)[1]
    long_task = wire.observation(JOINTS, CAMERAS, state(3))
    long_task.observation["task"] = "x" * 100_000  # refused before anything tokenizes it
    code, details = rpc_error(client.observe, long_task)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "observation.task: 100000 characters" in details and "max_prompt_chars" in details
    stream = [wire.messages().Observation(transfer_state=2, data=b"x")]
    code, details = rpc_error(client._observe, iter(stream))
    assert "without a TRANSFER_END" in details


def test_two_robots_are_batched(robot_server, policy):
    """Two robots (two connections, two peers) asking at once share one model call; each gets the
    actions of its own observation."""
    robot_server.recording.batches.clear()
    clients = [wire.Client(robot_server.address, f"robot-{i}") for i in range(2)]
    observations = [
        wire.observation(JOINTS, CAMERAS, state(10 + i), seed=10 + i, task=f"t{i}")
        for i in range(2)
    ]
    for c, obs in zip(clients, observations):
        c.ready()
        c.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=5))
        c.observe(obs)
    replies = [None, None]

    def ask(i):
        replies[i] = clients[i].actions()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert 2 in robot_server.recording.batches
    cfg = robot_server.app.state.cfg
    for obs, reply in zip(observations, replies):  # a batch of 2 rounds apart from a batch of 1
        got = wire.stack(wire.read_actions(reply))
        np.testing.assert_allclose(got, reference(policy, obs, cfg, 5), atol=1e-5)


def test_api_keys_travel_in_metadata(policy):
    server = wire.start_server(policy, SLOTS, api_keys=[KEY])
    try:
        anonymous = wire.Client(server.address)
        code, details = rpc_error(anonymous.ready)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
        keyed = wire.Client(server.address, metadata=[("authorization", f"Bearer {KEY}")])
        keyed.ready()
        keyed.setup(wire.policy_config(JOINTS, CAMERAS))
        anonymous.close()
        keyed.close()
    finally:
        server.__exit__(None, None, None)


def test_malicious_pickles_over_grpc_run_nothing(client, robot_server, policy, tmp_path):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Gadget:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    client.ready()
    code, details = rpc_error(client.setup, pickle.dumps(Gadget()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "posix.system is not allowed" in details
    client.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=2))
    evil = wire.observation(JOINTS, CAMERAS, state(4), seed=4)
    evil.observation["extra"] = Gadget()
    code, details = rpc_error(client.observe, pickle.dumps(evil))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not allowed" in details
    assert not marker.exists()
    good = wire.observation(JOINTS, CAMERAS, state(5), seed=5)
    client.observe(good)  # the server still serves this robot
    want = reference(policy, good, robot_server.app.state.cfg, 2)
    np.testing.assert_array_equal(wire.stack(wire.read_actions(client.actions())), want)


def test_inference_failure_is_a_grpc_error(client, robot_server, policy):
    client.ready()
    client.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=2))
    client.observe(wire.observation(JOINTS, CAMERAS, state(6), task="explode"))
    code, details = rpc_error(client.actions)
    assert code == grpc.StatusCode.INTERNAL and details == "inference failed: RuntimeError: kaboom"
    good = wire.observation(JOINTS, CAMERAS, state(7), seed=7, must_go=True)
    client.observe(good)
    want = reference(policy, good, robot_server.app.state.cfg, 2)
    np.testing.assert_array_equal(wire.stack(wire.read_actions(client.actions())), want)


def test_pi05_server_takes_policy_type_pi05():
    from flagscale.models.pi0 import PI0Policy

    pi05 = PI0Policy.random(preset="pi05_tiny", device="cpu", dtype="float32", seed=0)
    server = wire.start_server(pi05, SLOTS, preset="pi05_tiny", model_variant="pi0.5")
    try:
        client = wire.Client(server.address)
        client.ready()
        code, details = rpc_error(client.setup, wire.policy_config(JOINTS, CAMERAS))
        assert "policy_type 'pi0': this server serves pi05" in details
        client.setup(wire.policy_config(JOINTS, CAMERAS, actions_per_chunk=4, policy_type="pi05"))
        obs = wire.observation(JOINTS, CAMERAS, state(8), seed=8)
        client.observe(obs)
        want = reference(pi05, obs, server.app.state.cfg, 4)
        np.testing.assert_array_equal(wire.stack(wire.read_actions(client.actions())), want)
        client.close()
    finally:
        server.__exit__(None, None, None)
