"""The top-level API: the user's journey with one import, and ``import drasclr`` stays cheap."""
import subprocess
import sys

import drasclr

JOURNEY = ["train", "TrainConfig", "load_encoder", "CheckpointError",
           "extract_features", "evaluate", "Encoder", "LocCondConv3d"]


def test_journey_names_are_listed_and_resolve():
    listed = dir(drasclr)
    for name in JOURNEY:
        assert name in listed and name in drasclr.__all__, name
        value = getattr(drasclr, name)
        assert callable(value) and value.__name__ == name, name
    assert drasclr.Encoder is __import__("drasclr.nn", fromlist=["Encoder"]).Encoder


def test_unknown_name_is_an_attribute_error():
    try:
        drasclr.no_such_thing
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("drasclr.no_such_thing resolved")


def test_import_is_cheap():
    code = "import sys, drasclr; dir(drasclr); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nn_exports_only_public_names():
    import drasclr.nn

    private = {"as_partition", "interleave", "conv3d_by_landmark", "InterleavedPartition"}
    assert not private & set(drasclr.nn.__all__)
    for name in drasclr.nn.__all__:
        assert not name.startswith("_") and getattr(drasclr.nn, name) is not None
