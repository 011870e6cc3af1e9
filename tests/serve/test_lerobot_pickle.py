"""The restricted unpickler for lerobot payloads: real messages load, malicious pickles are refused
with PayloadError and nothing in them runs (a marker file is never created)."""

import io
import os
import pickle
import time

from pathlib import Path

import numpy as np
import pytest
import torch

from flagscale.serve import lerobot_pickle as lp
from flagscale.serve.lerobot_pickle import PayloadError, RemotePolicyConfig, TimedObservation

wire = pytest.importorskip("lerobot_wire")  # needs grpcio (the messages' module imports it)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "ran"
    yield path
    assert not path.exists(), "a payload ran code"


class Gadget:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def observation(**raw):
    return TimedObservation(1.0, 3, {"a.pos": 1.0, "task": "x", **raw}, True)


def test_real_messages_load():
    obs = observation(
        cam=np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
        b=np.float32(2.5),
        t=torch.arange(4.0),
        flags=np.array([True, False]),
    )
    for numpy1 in (False, True):
        got = lp.loads(wire.dumps(obs, numpy1=numpy1), TimedObservation)
        assert got.timestep == 3 and got.must_go is True
        np.testing.assert_array_equal(got.observation["cam"], obs.observation["cam"])
        assert got.observation["b"] == np.float32(2.5)
        assert torch.equal(got.observation["t"], torch.arange(4.0))
    spec = RemotePolicyConfig(
        "pi0", "x", {"s": lp.PolicyFeature(lp.FeatureType.STATE, (2,))}, 5, rename_map={"a": "b"}
    )
    got = lp.loads(wire.dumps(spec), RemotePolicyConfig)
    assert got.lerobot_features["s"].type is lp.FeatureType.STATE and got.rename_map == {"a": "b"}
    assert got.device == "cpu"


def gadgets(marker):
    command = f"touch {marker}"
    return {
        "os.system": Gadget((os.system, (command,))),
        "eval": Gadget((eval, (f"__import__('os').system({command!r})",))),
        "exec": Gadget((exec, (f"open({str(marker)!r}, 'w')",))),
        "getattr": Gadget((getattr, (marker, "touch"))),
        "__import__": Gadget((__import__, ("os",))),
        "Path.touch": Gadget((type(marker).touch, (marker,))),
        "np.load": Gadget((np.load, (str(marker),))),
        "torch.load": Gadget((torch.load, (str(marker),))),
        "copyreg": Gadget((__import__("copyreg")._reconstructor, (object, object, None))),
    }


@pytest.mark.parametrize("name", list(gadgets(Path("x"))))
def test_code_execution_gadgets_are_refused(marker, name):
    payload = pickle.dumps(observation(evil=gadgets(marker)[name]), protocol=4)
    with pytest.raises(PayloadError, match="is not allowed"):
        lp.loads(payload, TimedObservation)


def test_protocol_0_global_is_refused(marker):
    payload = f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(PayloadError, match="posix.system is not allowed"):
        lp.loads(payload, TimedObservation)


def test_nested_pickle_in_torch_storage_is_refused(marker):
    """torch.storage._load_from_bytes would torch.load(weights_only=False) its bytes; ours reads
    them with weights_only=True."""
    inner = pickle.dumps(Gadget((os.system, (f"touch {marker}",))))
    payload = (
        b"\x80\x04\x8c\rtorch.storage\x8c\x10_load_from_bytes\x93"
        + pickle.dumps(inner, protocol=4)[2:-1]
        + b"\x85R."
    )
    with pytest.raises(PayloadError, match="torch storage"):
        lp.loads(payload, TimedObservation)


def opcodes(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."


def glob(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + b"\x93"


def _text(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


def test_build_cannot_rewrite_classes_or_shared_objects():
    build_on_class = opcodes(
        glob(lp.HELPERS, "TimedObservation"),
        b"N}" + _text("__setstate__") + glob("builtins", "set") + b"s\x86b",
    )
    with pytest.raises(PayloadError, match="BUILD on a type"):
        lp.loads(build_on_class, TimedObservation)
    rewrite_enum = opcodes(
        glob(lp.TYPES, "FeatureType"),
        _text("STATE") + b"\x85R}" + _text("_value_") + _text("X") + b"sb",
    )
    with pytest.raises(PayloadError):
        lp.loads(rewrite_enum, TimedObservation)
    assert lp.FeatureType.STATE.value == "STATE"
    assert lp.TimedObservation.__setstate__ is lp._StandIn.__setstate__


def test_allocation_bombs_are_refused_quickly():
    start = time.monotonic()
    declared_terabyte = b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"xx."  # BINBYTES8
    ndarray_call = opcodes(glob("numpy", "ndarray"), b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R")
    array = np.zeros(4, np.uint8).__reduce__()
    huge_shape = wire.dumps(observation(cam=np.zeros(4, np.uint8))).replace(
        b"K\x04\x85", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85"  # shape (4,) -> (2**40,)
    )
    for payload in (declared_terabyte, ndarray_call, huge_shape):
        with pytest.raises(PayloadError):
            lp.loads(payload, TimedObservation)
    assert array[0].__name__ == "_reconstruct"
    assert time.monotonic() - start < 5


def test_deep_and_wide_payloads_are_refused():
    template = wire.dumps(observation(deep="PLACEHOLDER"))
    placeholder = _text("PLACEHOLDER")
    deep = template.replace(placeholder, b"]" * 100_000 + b"a" * 99_999)
    with pytest.raises(PayloadError, match="nested deeper"):
        lp.loads(deep, TimedObservation)
    wide = template.replace(placeholder, b"](" + b"K\x01" * 200_000 + b"e")
    with pytest.raises(PayloadError, match="larger than"):
        lp.loads(wide, TimedObservation)


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([1, "a"], dtype=object), "numpy.dtype: 'O8' refused"),
        (np.zeros(2, dtype=[("a", "f4")]), "numpy.dtype"),
        (np.array(["ab"]), "numpy.dtype"),
        (np.complex64(1j), "numpy.dtype"),
        (bytearray(b"x"), "builtins.bytearray is not allowed"),
        (lp.TimedAction(0.0, 0, None), "is not allowed"),
    ],
)
def test_non_numeric_arrays_and_other_types_are_refused(value, message):
    with pytest.raises(PayloadError, match=message):
        lp.loads(wire.dumps(observation(v=value)), TimedObservation)


def test_wrong_message_type_persistent_ids_and_garbage():
    with pytest.raises(PayloadError, match="expected a TimedObservation, got dict"):
        lp.loads(pickle.dumps({"a": 1}), TimedObservation)
    with pytest.raises(PayloadError, match="expected a RemotePolicyConfig"):
        lp.loads(wire.dumps(observation()), RemotePolicyConfig)
    with pytest.raises(PayloadError, match="persistent"):
        lp.loads(b"\x80\x04\x8c\x01x\x94Q.", TimedObservation)
    for garbage in (b"", b"\x80\x04", b"not a pickle", os.urandom(64)):
        with pytest.raises(PayloadError):
            lp.loads(garbage, TimedObservation)


def test_unknown_fields_are_refused():
    obs = observation()
    obs.__dict__["__class__"] = "x"
    with pytest.raises(PayloadError, match="unknown fields"):
        lp.loads(wire.dumps(obs), TimedObservation)


def test_mutated_payloads_load_or_are_refused(marker):
    """Random byte flips of a real observation: every result is a TimedObservation or a
    PayloadError, never another exception."""
    payload = bytearray(wire.dumps(observation(cam=np.zeros((2, 2, 3), np.uint8), t=torch.ones(2))))
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(400):
        mutated = bytearray(payload)
        for index in rng.integers(0, len(mutated), rng.integers(1, 4)):
            mutated[index] = rng.integers(0, 256)
        try:
            lp.loads(bytes(mutated), TimedObservation)
            outcomes["loaded"] += 1
        except PayloadError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 400


def test_reply_pickle_names_lerobot_classes_only():
    """The globals lerobot's client resolves: TimedAction and torch's tensor rebuild, nothing of
    ours."""
    import pickletools

    rows = [torch.arange(3, dtype=torch.float32) + i for i in range(3)]
    data = lp.dumps_actions([lp.TimedAction(1.5 + i, 4 + i, row) for i, row in enumerate(rows)])
    strings, names = [], set()
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
    assert names == {
        "lerobot.async_inference.helpers.TimedAction",
        "torch._utils._rebuild_tensor_v2",
        "torch.storage._load_from_bytes",
        "collections.OrderedDict",
    }
    actions = wire.read_actions(data)
    assert [(a.timestamp, a.timestep) for a in actions] == [(1.5, 4), (2.5, 5), (3.5, 6)]
    assert all(torch.equal(a.action, row) for a, row in zip(actions, rows))
    assert lp.dumps_actions([]) == pickle.dumps([], protocol=3)
