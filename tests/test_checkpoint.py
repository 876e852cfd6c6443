"""Checkpoints: bitwise round trips, keep-N, resume, restore onto another mesh, checksums, clear errors that keep good steps."""

import asyncio
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from flax import struct

from processes import free_port, subprocess_env
from transformer.checkpoint import CheckpointUnreadable, Checkpointer


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def make_state(step: int = 0) -> TrainState:
    """A tiny train state whose every array depends on `step` (Adam moments after one update, so not zeros)."""
    rng = np.random.default_rng(step)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
        # Boxed as train/step.py boxes them; over 1 KiB, so Orbax stores it outside its CRC-checked index.
        "embed": nn.Partitioned(jnp.asarray(rng.normal(size=(64, 8)), jnp.float32), names=("vocab", "embed")),
    }
    optimizer = optax.adamw(1e-3)
    _, opt_state = optimizer.update(params, optimizer.init(params), params)
    return TrainState(step=jnp.array(step, jnp.int32), params=params, opt_state=opt_state, rng=jax.random.key(step))


def assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(e)
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


ABSTRACT = jax.eval_shape(make_state)  # shardings unset: restored onto the one local device


@pytest.fixture
def checkpoints(tmp_path):
    return tmp_path / "run" / "checkpoints"


def saved(directory, steps, **options) -> Checkpointer:
    """A Checkpointer over `directory` that has saved make_state(s) with data state {"next_index": s} for each step."""
    checkpointer = Checkpointer(directory, **options)
    for step in steps:
        checkpointer.save(step, make_state(step), {"next_index": step})
    checkpointer.wait()
    return checkpointer


def fields(state: TrainState) -> dict:
    """The train state as a plain dict of its fields (not recursive: nn.Partitioned boxes stay)."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


@pytest.mark.parametrize("as_dict", [False, True], ids=["struct_dataclass", "dict"])
def test_round_trip_is_bitwise_and_restore_params_reads_params_only(checkpoints, as_dict):
    state, abstract = make_state(7), ABSTRACT
    if as_dict:
        state, abstract = fields(state), fields(abstract)
    checkpointer = Checkpointer(checkpoints)
    checkpointer.save(7, state, {"next_index": 3, "epoch": [1, 2]})
    restored, data_state = checkpointer.restore(abstract)
    assert type(restored) is type(state)
    assert_bitwise_equal(restored, state)
    assert data_state == {"next_index": 3, "epoch": [1, 2]}
    # Only the params item is read: they restore even with the optimizer state gone.
    shutil.rmtree(checkpoints / "7" / "train_state")
    params = checkpointer.restore_params(ABSTRACT.params)
    assert_bitwise_equal(params, make_state(7).params)
    assert params["embed"].names == ("vocab", "embed")
    checkpointer.close()


def test_no_data_state_restores_as_none(checkpoints):
    checkpointer = Checkpointer(checkpoints, async_save=False)
    checkpointer.save(1, make_state(1))
    assert checkpointer.restore(ABSTRACT)[1] is None
    checkpointer.close()


def test_keep_n_newest_and_resume_after_restart(checkpoints):
    checkpointer = saved(checkpoints, [1, 2, 3, 4], keep=2)
    assert checkpointer.all_steps() == [3, 4] and checkpointer.latest_step() == 4
    assert sorted(os.listdir(checkpoints)) == ["3", "4"]
    checkpointer.close()

    resumed = Checkpointer(checkpoints, keep=2)  # a new process over the same run
    assert resumed.all_steps() == [3, 4] and resumed.latest_step() == 4
    state, data_state = resumed.restore(ABSTRACT)
    assert_bitwise_equal(state, make_state(4))
    assert data_state == {"next_index": 4}
    resumed.save(5, make_state(5))
    resumed.close()
    assert sorted(os.listdir(checkpoints)) == ["4", "5"]


def test_async_save_is_complete_after_wait_even_if_the_state_is_donated(checkpoints):
    checkpointer = Checkpointer(checkpoints)
    state = make_state(3)
    checkpointer.save(3, state, {"next_index": 3})
    for leaf in jax.tree.leaves(state):
        leaf.delete()  # what donating the state to the next train step does
    checkpointer.wait()
    assert (checkpoints / "3" / "params").is_dir()
    fresh = Checkpointer(checkpoints)
    assert_bitwise_equal(fresh.restore(ABSTRACT)[0], make_state(3))
    fresh.close()
    checkpointer.close()


# ------------------------------------------------------------------------- other meshes

MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, sys.argv[1])
import test_checkpoint as t
from transformer.checkpoint import Checkpointer

mesh = Mesh(np.array(jax.devices()), ("fsdp",))

def sharding(leaf):  # the first axis over all 8 devices where it divides, else replicated
    spec = PartitionSpec("fsdp") if leaf.ndim and leaf.shape[0] % 8 == 0 else PartitionSpec()
    return NamedSharding(mesh, spec)

checkpointer = Checkpointer(sys.argv[2])
if sys.argv[3] == "save":
    state = jax.device_put(t.make_state(5), jax.tree.map(sharding, t.ABSTRACT))
    checkpointer.save(5, state, {"next_index": 5})
    kernel = state.params["dense"]["kernel"]
else:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), t.ABSTRACT)
    state, data_state = checkpointer.restore(abstract)
    t.assert_bitwise_equal(state, t.make_state(5))
    kernel = state.params["dense"]["kernel"]
checkpointer.close()
print(json.dumps({"devices": len(kernel.sharding.device_set), "spec": list(kernel.sharding.spec)}))
"""


def on_8_devices(directory, action: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, os.path.dirname(__file__), str(directory), action],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_on_8_devices_restores_onto_1(checkpoints):
    assert on_8_devices(checkpoints, "save") == {"devices": 8, "spec": ["fsdp"]}
    checkpointer = Checkpointer(checkpoints)
    state, data_state = checkpointer.restore(ABSTRACT)
    assert_bitwise_equal(state, make_state(5))
    assert data_state == {"next_index": 5}
    assert len(state.params["dense"]["kernel"].sharding.device_set) == 1
    checkpointer.close()


def test_saved_on_1_device_restores_onto_8(checkpoints):
    saved(checkpoints, [5]).close()
    assert on_8_devices(checkpoints, "restore") == {"devices": 8, "spec": ["fsdp"]}


# ------------------------------------------------------------------------- errors


def test_empty_directory_is_file_not_found_and_creates_nothing(checkpoints):
    checkpointer = Checkpointer(checkpoints)
    assert checkpointer.all_steps() == [] and checkpointer.latest_step() is None
    with pytest.raises(FileNotFoundError, match=f"No checkpoint in {checkpoints}"):
        checkpointer.restore(ABSTRACT)
    with pytest.raises(FileNotFoundError, match=f"No checkpoint in {checkpoints}"):
        checkpointer.restore_params(ABSTRACT.params)
    assert not checkpoints.exists()


def test_unknown_step_lists_the_available_steps(checkpoints):
    checkpointer = saved(checkpoints, [1, 2])
    with pytest.raises(FileNotFoundError, match=rf"step 9 in {checkpoints}; available steps: \[1, 2\]"):
        checkpointer.restore(ABSTRACT, step=9)
    checkpointer.close()


def truncate_files(folder: pathlib.Path):
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated array data": lambda step_dir: truncate_files(step_dir / "params" / "d"),
    "garbled metadata": lambda step_dir: (step_dir / "train_state" / "_METADATA").write_bytes(b"\x00garbage{"),
    "missing item": lambda step_dir: shutil.rmtree(step_dir / "params"),
    "missing data state": lambda step_dir: shutil.rmtree(step_dir / "data"),
    "empty step directory": lambda step_dir: [shutil.rmtree(step_dir), step_dir.mkdir()],
}


@pytest.mark.filterwarnings("ignore:Checkpoint .* has no checksums.json")
@pytest.mark.parametrize("checked", [True, False], ids=["checksums", "no_checksums"])  # no_checksums: Orbax's own errors
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_step_raises_naming_it_and_the_older_steps(checkpoints, damage, checked):
    saved(checkpoints, [1, 2, 3]).close()
    if not checked:  # as saved by older code
        for step in (1, 2, 3):
            (checkpoints / str(step) / "checksums.json").unlink()
    DAMAGE[damage](checkpoints / "3")
    checkpointer = Checkpointer(checkpoints, step_option="resume_step=N")  # as after a crash and restart
    unreadable = rf"Checkpoint {checkpoints / '3'} cannot be read .*\[1, 2\]; choose one with resume_step=N\.$"
    with pytest.raises(CheckpointUnreadable, match=unreadable) as error:
        checkpointer.restore(ABSTRACT)
    assert error.value.step == 3
    assert checkpointer.all_steps() == [1, 2, 3] and (checkpoints / "3").is_dir()  # nothing deleted
    state, data_state = checkpointer.restore(ABSTRACT, step=2)
    assert_bitwise_equal(state, make_state(2))
    assert data_state == {"next_index": 2}
    checkpointer.close()


def test_a_different_model_is_a_mismatch_error_naming_the_arrays(checkpoints):
    checkpointer = saved(checkpoints, [1])
    wider = jax.eval_shape(lambda: make_state().replace(params={**make_state().params, "dense": {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros(4), "extra": jnp.zeros(2)}}))
    with pytest.raises(ValueError, match=rf"Checkpoint {checkpoints / '1'} \(params\) does not match") as error:
        checkpointer.restore(wider)
    assert not isinstance(error.value, CheckpointUnreadable)  # a configuration mismatch, not damage to fall back from
    assert "1 requested arrays not in the checkpoint: dense.extra" in str(error.value)
    assert "dense.kernel saved (16, 4) requested (16, 5)" in str(error.value)
    with pytest.raises(ValueError, match=r"\(params\) does not match"):
        checkpointer.restore_params(wider.params)
    assert_bitwise_equal(checkpointer.restore(ABSTRACT)[0], make_state(1))
    checkpointer.close()


def test_saving_an_existing_or_older_step_never_replaces_a_checkpoint(checkpoints):
    checkpointer = saved(checkpoints, [2, 4])
    checkpointer.save(4, make_state(99), {"next_index": 99})  # exists: skipped without error
    with pytest.raises(ValueError, match=f"Step 3 is older than the latest checkpoint \\(step 4\\) in {checkpoints}"):
        checkpointer.save(3, make_state(3))
    checkpointer.save(3, make_state(3), force=True)
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 3, 4] and checkpointer.latest_step() == 4
    state, data_state = checkpointer.restore(ABSTRACT)
    assert_bitwise_equal(state, make_state(4))
    assert data_state == {"next_index": 4}
    checkpointer.close()


def test_bad_arguments_fail_before_writing(checkpoints):
    with pytest.raises(ValueError, match="keep >= 1"):
        Checkpointer(checkpoints, keep=0)
    checkpointer = Checkpointer(checkpoints)
    with pytest.raises(TypeError, match="data_state must be JSON-serialisable"):
        checkpointer.save(1, make_state(1), {"order": np.arange(3)})
    with pytest.raises(TypeError, match="a dataclass with a `params` field .* or a dict with a 'params' key"):
        checkpointer.save(1, (make_state(1).params,))
    checkpointer.wait()
    assert checkpointer.all_steps() == [] and not checkpoints.exists()
    checkpointer.close()


# ------------------------------------------------------------------------- checksums, set_aside, unwritable folder


def flip_a_bit(folder: pathlib.Path) -> str:
    """Flips a bit in the middle of the largest file under `folder` (same size); returns its path in the step."""
    path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return path.relative_to(folder.parent).as_posix()


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_checksums_cover_every_file_of_a_step(checkpoints, async_save):
    saved(checkpoints, [1], async_save=async_save).close()
    step_dir = checkpoints / "1"
    files = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    checksums = json.loads((step_dir / "checksums.json").read_text())
    assert sorted(checksums) == [f for f in files if f != "checksums.json"]
    assert any(f.startswith("params/") for f in checksums) and "_CHECKPOINT_METADATA" in checksums


def test_a_flipped_bit_is_unreadable_naming_the_file_and_older_steps_still_restore(checkpoints):
    saved(checkpoints, [1, 2]).close()
    flipped = flip_a_bit(checkpoints / "2" / "params")  # Orbax alone restores it without error, with other values
    checkpointer = Checkpointer(checkpoints)
    for restore in (lambda: checkpointer.restore(ABSTRACT), lambda: checkpointer.restore_params(ABSTRACT.params)):
        with pytest.raises(CheckpointUnreadable, match=rf"{checkpoints / '2'} cannot be read \({flipped} differs from its checksum .*\[1\]") as error:
            restore()
        assert error.value.step == 2
    state, data_state = checkpointer.restore(ABSTRACT, step=1)
    assert_bitwise_equal(state, make_state(1))
    assert data_state == {"next_index": 1}
    assert_bitwise_equal(checkpointer.restore_params(ABSTRACT.params, step=1), make_state(1).params)
    checkpointer.close()


def test_a_step_without_checksums_restores_with_a_warning(checkpoints):
    checkpointer = saved(checkpoints, [1])
    (checkpoints / "1" / "checksums.json").unlink()  # as saved by older code, or killed before writing it
    with pytest.warns(UserWarning, match=f"Checkpoint {checkpoints / '1'} has no checksums.json"):
        state, data_state = checkpointer.restore(ABSTRACT)
    assert_bitwise_equal(state, make_state(1))
    assert data_state == {"next_index": 1}
    with pytest.warns(UserWarning, match="has no checksums.json"):
        assert_bitwise_equal(checkpointer.restore_params(ABSTRACT.params), make_state(1).params)
    checkpointer.close()


def test_a_step_cut_off_before_its_checksums_gives_way_to_the_checked_step_before(checkpoints):
    """A process stopped between Orbax's commit and checksums.json leaves a step that cannot be
    checked: it is unreadable (so a resume falls back), not restored unchecked for ever."""
    saved(checkpoints, [1, 2]).close()
    (checkpoints / "2" / "checksums.json").unlink()  # what the stop leaves
    checkpointer = Checkpointer(checkpoints)
    for restore in (lambda: checkpointer.restore(ABSTRACT), lambda: checkpointer.restore_params(ABSTRACT.params)):
        with pytest.raises(CheckpointUnreadable, match=r"checkpoints/2 cannot be read \(it has no checksums.json, which "
                                                       r"the process did not write after saving it") as error:
            restore()
        assert error.value.step == 2
    assert_bitwise_equal(checkpointer.restore(ABSTRACT, step=1)[0], make_state(1))
    checkpointer.close()


KILLED_WHILE_DELETING = """
import os, sys
import numpy as np
from transformer.checkpoint import Checkpointer
checkpointer = Checkpointer(sys.argv[1], keep=1, async_save=False)
checkpointer.save(1, {"params": {"w": np.zeros(4, np.float32)}})
os.unlink = lambda *args, **kwargs: os._exit(9)  # killed at the first file keep-N deletes (of step 1)
checkpointer.save(2, {"params": {"w": np.ones(4, np.float32)}})
"""


def test_a_process_killed_while_keep_n_deletes_a_step_leaves_no_half_step(checkpoints):
    """Retention moves a step out of the steps before deleting its files: a half-deleted step was
    counted as a step (and restored, or resumed from). What is left is deleted by the next save."""
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_DELETING, str(checkpoints)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    checkpointer = Checkpointer(checkpoints, keep=1)
    assert checkpointer.all_steps() == [2] and not (checkpoints / "1").exists()
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}}
    np.testing.assert_array_equal(checkpointer.restore(abstract)[0]["params"]["w"], np.ones(4))
    checkpointer.save(3, {"params": {"w": np.full(4, 3, np.float32)}})
    checkpointer.close()
    assert sorted(os.listdir(checkpoints)) == ["3"]


def test_set_aside_moves_a_step_out_and_its_number_can_be_saved_again(checkpoints, tmp_path):
    checkpointer = saved(checkpoints, [1, 2, 3])
    destination = tmp_path / "run" / "set_aside" / "step-3-damaged"
    checkpointer.set_aside(3, destination)
    assert (destination / "params").is_dir() and (destination / "checksums.json").is_file()
    assert not (checkpoints / "3").exists()
    assert checkpointer.all_steps() == [1, 2] and Checkpointer(checkpoints).all_steps() == [1, 2]
    with pytest.raises(FileExistsError, match=f"aside to {destination}: it exists"):
        checkpointer.set_aside(2, destination)
    with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[1, 2\]"):
        checkpointer.set_aside(3, tmp_path / "elsewhere")
    assert checkpointer.all_steps() == [1, 2] and (checkpoints / "2").is_dir()
    checkpointer.save(3, make_state(33), {"next_index": 33})
    state, data_state = checkpointer.restore(ABSTRACT)
    assert_bitwise_equal(state, make_state(33))
    assert data_state == {"next_index": 33}
    checkpointer.close()


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_an_unwritable_folder_fails_in_save_and_saving_works_again_after(checkpoints, monkeypatch, async_save):
    """A read-only folder makes Orbax's mkdir fail (simulated: chmod does not stop root). Made in a
    background thread, that failure left threads waiting 300 s for the directory, holding up exit."""
    checkpointer = saved(checkpoints, [1], async_save=async_save)
    mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(checkpoints)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(PermissionError, match=f"Cannot write checkpoints in {checkpoints} .*Make the folder writable"):
        checkpointer.save(2, make_state(2))
    checkpointer.wait()
    assert checkpointer.all_steps() == [1]
    monkeypatch.undo()
    checkpointer.save(2, make_state(2), {"next_index": 2})
    assert_bitwise_equal(checkpointer.restore(ABSTRACT)[0], make_state(2))
    checkpointer.close()


def test_a_disk_too_full_for_the_state_fails_before_writing(checkpoints, monkeypatch):
    """Checked up front: a save that runs out of space fails inside Orbax's threads, with pages of their errors."""
    checkpointer = saved(checkpoints, [1])
    free = sum(leaf.nbytes for leaf in jax.tree.leaves(make_state(2))) - 1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    with pytest.raises(OSError, match=r"No space left for checkpoint step 2 in .*: it needs about .* MiB are free") as error:
        checkpointer.save(2, make_state(2))
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert checkpointer.all_steps() == [1] and not (checkpoints / "2").exists()
    checkpointer.save(2, make_state(2))  # once there is room
    assert_bitwise_equal(checkpointer.restore(ABSTRACT)[0], make_state(2))
    checkpointer.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_read_that_ends_after_orbax_gave_up_on_it_prints_nothing(checkpoints):
    """Once a read or write of an Orbax operation fails, Orbax closes the operation's event loop
    with tensorstore's others still pending, and each of those printed "Event loop is closed" with
    a traceback as it ended (restoring a damaged step without checksums did, in these tests).
    Here a tensorstore read ends after the loop waiting for it was closed."""
    Checkpointer(checkpoints)
    done, read = ts.Promise.new()

    async def start_reading():
        next(read.__await__())  # tensorstore will report the result to this event loop

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start_reading())
    loop.close()  # as Orbax closes it, the operation having failed
    done.set_result(b"")  # reported to the closed loop: RuntimeError("Event loop is closed"), not raised here


SET_ASIDE_BY_TWO_PROCESSES = """
import os, sys, time
import jax, numpy as np
rank, address, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=rank)
from transformer.checkpoint import Checkpointer
checkpointer = Checkpointer(os.path.join(root, "checkpoints"), keep=5)
for step in (1, 2):
    checkpointer.save(step, {"params": {"w": np.arange(4.0, dtype=np.float32) + step}})
checkpointer.wait()
time.sleep(0.5 * rank)  # a slower host checks after process 0 could have moved the step
checkpointer.set_aside(2, os.path.join(root, "set_aside", "step-2-damaged"))
print("steps", checkpointer.all_steps())
"""


def test_two_processes_set_a_step_aside_together(tmp_path):
    """Every process checks the step and the destination before process 0 moves the files (a
    slower process found the step gone and the destination taken, and stopped)."""
    address = f"localhost:{free_port()}"
    processes = [
        subprocess.Popen([sys.executable, "-c", SET_ASIDE_BY_TWO_PROCESSES, str(rank), address, str(tmp_path)],
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), "\n\n".join(o[-2000:] for o in outputs)
    assert all("steps [1]" in output for output in outputs)
    assert (tmp_path / "set_aside" / "step-2-damaged").is_dir() and not (tmp_path / "checkpoints" / "2").exists()
