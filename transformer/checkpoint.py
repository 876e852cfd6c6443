"""Checkpoints of a run: Orbax `CheckpointManager` with async save, keep-N and resume.

Every step directory holds three Orbax items:

    params        the model parameters (StandardSave): all a sampler needs
    train_state   the rest of the train state, with its `params` entry set to None
    data          the data iterator's state (JSON; null when there is none)

and `checksums.json`, the sha256 of each of its files, written by process 0 once the step is
complete on disk (on Orbax's finalize thread when saving asynchronously). Restoring checks the
files it reads against it first, so a flipped bit is reported instead of read. A step without
it that is newer than one with it was cut off between Orbax's commit and the checksums (the
process stopped): it is unreadable, so that the older, checked step is restored instead. Steps
saved by older code, none of which has checksums, restore with a warning.

Splitting the parameters out lets `restore_params` read them without touching the
optimizer state. Arrays are restored onto the shardings of the abstract state passed in,
whatever mesh they were saved from, so a checkpoint written on 8 devices restores onto 1
and the other way round.

Nothing here ever deletes or overwrites a checkpoint except keep-N retention after a
successful save, which first moves the step out of the steps (into `deleting/`, which Orbax
does not count), so a process stopped while deleting leaves no half-deleted step behind. Saving
a step that exists is skipped, and a checkpoint that cannot be read raises
`CheckpointUnreadable` (naming the other steps to fall back to) and is left in place until
`set_aside` moves it out of the folder.

A write that fails (a full disk, a folder turned read-only), in `save` or in Orbax's threads,
is raised by the next `save`, `wait` or `close` as an OSError naming the folder and the fix.
What Orbax prints of it besides is left out: absl's records of it, a traceback each, and
tensorstore's "Event loop is closed" for each read or write still pending when Orbax gave up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from transformer.files import file_digests, sha256_file, write_atomically

CHECKSUMS = "checksums.json"  # in each step directory: {path relative to it: sha256 hex digest}
DELETING = "deleting"  # in the checkpoints folder: steps that keep-N retention is deleting
_SET_ASIDE_CALLS = itertools.count()  # numbers set_aside's barriers (every process calls it in the same order)
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")  # the errno in tensorstore's message of a failed write


class CheckpointUnreadable(ValueError):
    """A checkpoint step that is missing files, damaged or incomplete; `step` is that step,
    `reason` what is wrong with it."""

    def __init__(self, message: str, step: int, reason: str):
        super().__init__(message)
        self.step = step
        self.reason = reason


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's CheckpointManager, writing each saved step's checksums once the step is on disk,
    and emptying `deleting/` once retention has moved the steps it removes there."""

    def _finalize_checkpoint(self, step: int) -> None:
        # Orbax calls this after committing the step directory (on its finalize thread when saving
        # asynchronously, else in save) and before the barrier that ends the save on every process.
        super()._finalize_checkpoint(step)
        step_dir = pathlib.Path(self.directory) / str(step)
        if jax.process_index() == 0 and step_dir.is_dir():  # not there if the commit failed
            try:
                _write_checksums(step_dir)
            except OSError as error:  # the step itself is saved: keep it (a resume prefers an older checked one)
                warnings.warn(
                    f"Could not write {CHECKSUMS} for checkpoint {step_dir} ({error}); the step is saved, but "
                    f"cannot be checked for damage, so a resume will prefer the checked step before it."
                )

    def _finalize(self, step: int, steps_to_remove: list[int]) -> None:
        # Orbax moves the steps it removes into DELETING/ (todelete_subdir), after the checksums are
        # written; emptied before too, of what a process stopped while deleting left there.
        deleting = pathlib.Path(self.directory) / DELETING
        if jax.process_index() == 0:
            shutil.rmtree(deleting, ignore_errors=True)
        super()._finalize(step, steps_to_remove)
        if jax.process_index() == 0:
            shutil.rmtree(deleting, ignore_errors=True)


class Checkpointer:
    """Orbax CheckpointManager for a run directory's `checkpoints/` folder.

    directory: the checkpoints folder itself (e.g. `run_dir / "checkpoints"`); it is created
        by the first save, so restoring from a wrong path creates nothing.
    keep: how many steps to keep; the others are deleted after each save. These are the newest,
        except after `save(force=True)` of an older step: then the last saved since this
        Checkpointer opened the folder (or last set a step aside).
    async_save: write in a background thread. `save` returns once the arrays are copied off
        the devices, so the state may be donated to the next train step straight away.
    step_option: how the user of this checkpointer names a step, for the message of an
        unreadable one (e.g. "resume_step=N" for the training job).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 step_option: str = "restore(step=N)"):
        if keep < 1:
            raise ValueError(f"keep={keep}: a checkpointer must keep at least the newest checkpoint (keep >= 1).")
        self._directory = epath.Path(os.path.abspath(directory))  # Orbax needs absolute paths
        self._step_option = step_option
        _quiet_failed_writes()
        self._metadata_reader = ocp.StandardCheckpointHandler()
        self._manager = _CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                create=False,
                enable_async_checkpointing=async_save,
                # Create the step's directory in save, so an unwritable folder raises there. Created in
                # the background, a failure leaves Orbax threads waiting 300 s for the directory,
                # which holds up the process's exit.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
                preservation_policy=ocp.checkpoint_managers.LatestN(keep),
                todelete_subdir=DELETING,  # moved out of the steps before it is deleted
            ),
            handler_registry=ocp.handlers.create_default_handler_registry(
                params=ocp.StandardCheckpointHandler(),
                train_state=ocp.StandardCheckpointHandler(),
                data=ocp.JsonCheckpointHandler(),
            ),
        )

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> None:
        """Saves `state` (a dataclass with a `params` field or a dict with a "params" key) as `step`.

        A step that already exists is skipped without error: the checkpoint on disk stays.
        A step older than the latest raises, since keep-N would treat the newer steps as the
        run's future; force=True saves it anyway (after restoring an older step on purpose).
        """
        _check_json(data_state)
        if step in self.all_steps():
            return
        latest = self.latest_step()
        if latest is not None and step < latest and not force:
            raise ValueError(
                f"Step {step} is older than the latest checkpoint (step {latest}) in {self._directory}. "
                f"Move the newer steps away if this run restarted from an older one, or pass force=True."
            )
        params, rest = _split_params(state)
        with self._writing():
            self._directory.mkdir(parents=True, exist_ok=True)
        self._check_free_space(step, state)
        with self._writing():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    train_state=ocp.args.StandardSave(rest),
                    data=ocp.args.JsonSave(data_state),
                ),
                force=True,  # the caller decides when to save; Orbax's interval policy stays out of it
            )

    def _check_free_space(self, step: int, state) -> None:
        """Raises OSError(ENOSPC) before writing when the disk cannot hold the state's bytes: a save
        that runs out of space fails in Orbax's threads, with pages of their errors."""
        needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
        free = shutil.disk_usage(self._directory).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left for checkpoint step {step} in {self._directory}: it needs about "
                f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. Free some space (or keep fewer "
                f"checkpoints); the steps already saved are untouched.",
            )

    def latest_step(self) -> int | None:
        """The highest saved step (including one still being written), or None.

        By number, so it agrees with restore(step=None) after a forced save of an older step
        (Orbax's own latest_step is the one saved last).
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Saved steps in increasing order."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> tuple[object, dict | None]:
        """(state, data_state) of `step` (None: the latest), laid out like `abstract_state`.

        abstract_state: the state's pytree of jax.ShapeDtypeStruct (e.g. from jax.eval_shape),
            or of arrays; leaves without a sharding are restored onto the first local device.
            Dtypes may differ from the saved ones (values are cast); structure and shapes may not.
        """
        step = self._step_to_read(step)
        self._verify(step, ["params", "train_state", "data"])
        abstract_params, abstract_rest = _split_params(_abstract(abstract_state))
        self._check_matches(step, "params", abstract_params)
        self._check_matches(step, "train_state", abstract_rest)
        restored = self._read(
            step,
            params=ocp.args.StandardRestore(abstract_params),
            train_state=ocp.args.StandardRestore(abstract_rest),
            data=ocp.args.JsonRestore(),
        )
        return _join_params(restored["train_state"], restored["params"]), restored["data"]

    def restore_params(self, abstract_params, step: int | None = None):
        """The parameters of `step` (None: the latest) laid out like `abstract_params`; nothing else is read."""
        step = self._step_to_read(step)
        self._verify(step, ["params"])
        abstract_params = _abstract(abstract_params)
        self._check_matches(step, "params", abstract_params)
        return self._read(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def set_aside(self, step: int, destination: str | os.PathLike) -> None:
        """Moves `step`'s directory to `destination` and forgets the step; nothing is deleted.

        For a damaged step, or the newer steps when a run goes back to an older one: the step no
        longer counts as saved, so it can be saved again. `destination` must not exist; its parent
        folders are created. Every process calls it, in the same order; every process checks
        before process 0 moves the files (to its `destination`), and none goes on before they are
        moved.
        """
        self._step_to_read(step)
        destination = pathlib.Path(os.path.abspath(destination))
        if destination.exists():
            raise FileExistsError(
                f"Cannot set checkpoint {self._step_dir(step)} aside to {destination}: it exists. "
                f"Pass a destination that does not exist yet; nothing was moved."
            )
        call = next(_SET_ASIDE_CALLS)  # the barriers' names: the same on every process, never reused
        ocp.multihost.sync_global_processes(f"Checkpointer:set_aside:{call}:checked")
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self._step_dir(step), destination)
        ocp.multihost.sync_global_processes(f"Checkpointer:set_aside:{call}:moved")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises if one of them failed."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads; raises if one of the saves failed."""
        try:
            with self._writing():
                self._manager.close()
        finally:
            self._metadata_reader.close()

    def _step_dir(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def _step_to_read(self, step: int | None) -> int:
        """`step`, or the latest when None, after checking it exists and no save of it is pending."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {self._directory}; pass the run's checkpoints folder "
                f"(run_dir/checkpoints) of a run that has saved at least once."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self._directory}; available steps: {steps}."
            )
        return step

    def _verify(self, step: int, items: Iterable[str]) -> None:
        """Raises CheckpointUnreadable unless the step's files that `items` read match its checksums,
        or the step has none and neither has any older step (all saved by older code)."""
        step_dir = pathlib.Path(self._step_dir(step))
        if not (step_dir / CHECKSUMS).exists():
            if any((pathlib.Path(self._step_dir(s)) / CHECKSUMS).exists() for s in self.all_steps() if s < step):
                raise self._unreadable(
                    step, f"it has no {CHECKSUMS}, which the process did not write after saving it, so its files "
                    f"cannot be checked"
                )
            warnings.warn(
                f"Checkpoint {step_dir} has no {CHECKSUMS} (saved by older code, or the process stopped "
                f"just after saving it), so its files cannot be checked for damage; restoring it unchecked.",
                stacklevel=3,
            )
            return
        try:
            checksums = json.loads((step_dir / CHECKSUMS).read_text())
            if not isinstance(checksums, dict):
                raise ValueError(f"{CHECKSUMS} holds a {type(checksums).__name__}, not a mapping")
        except (OSError, ValueError) as error:
            raise self._unreadable(step, error) from error
        for name, digest in sorted(checksums.items()):
            if "/" in name and name.split("/")[0] not in items:
                continue  # in an item this restore does not read
            if not (step_dir / name).is_file():
                raise self._unreadable(step, f"{name} is missing")
            if sha256_file(step_dir / name) != digest:
                raise self._unreadable(step, f"{name} differs from its checksum in {CHECKSUMS}")

    def _check_matches(self, step: int, item: str, abstract) -> None:
        """Raises ValueError unless the saved `item` has the arrays and shapes of `abstract`."""
        path = self._step_dir(step) / item
        if not path.exists():
            raise self._unreadable(step, f"its {item!r} item is missing")
        try:
            metadata = self._metadata_reader.metadata(path)
        except Exception as error:  # any failure to parse Orbax's files means a damaged checkpoint
            raise self._unreadable(step, error) from error
        if metadata is None:
            raise self._unreadable(step, f"its {item!r} item has no metadata file")
        saved = ocp.tree.to_flat_dict(metadata.tree, sep=".")
        wanted = ocp.tree.to_flat_dict(abstract, sep=".")
        problems = _differences(saved, wanted)
        if problems:
            raise ValueError(
                f"Checkpoint {self._step_dir(step)} ({item}) does not match the requested state: "
                f"{'; '.join(problems)}. Build the abstract state from the model and optimizer "
                f"configuration the run was saved with."
            )

    def _read(self, step: int, **items: ocp.args.CheckpointArgs) -> ocp.args.Composite:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # metadata matched, so a failure here is in the saved files
            raise self._unreadable(step, error) from error

    def _unreadable(self, step: int, cause: Exception | str) -> CheckpointUnreadable:
        """The error for a step whose files cannot be read, naming the steps to fall back to."""
        if isinstance(cause, Exception):
            lines = str(cause).strip().splitlines()
            cause = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
        others = [s for s in self.all_steps() if s != step]
        fallback = (
            f"Other steps in {self._directory}: {others}; choose one with {self._step_option}"
            if others
            else f"There is no other step in {self._directory} to fall back to"
        )
        return CheckpointUnreadable(
            f"Checkpoint {self._step_dir(step)} cannot be read ({cause}); it may be damaged or "
            f"incomplete and was left in place. {fallback}.",
            step,
            cause,
        )

    @contextlib.contextmanager
    def _writing(self):
        """Re-raises a failure to write a file, in the calling thread or in Orbax's, as an OSError
        of its errno (a PermissionError for EACCES...) naming the folder and the fix."""
        try:
            yield
        except Exception as error:
            failed = _failed_write(error)
            if failed is None:
                raise
            _quiet_abandoned_operations()
            where = f": {failed.filename}" if failed.filename else ""
            raise OSError(
                failed.errno,
                f"Cannot write checkpoints in {self._directory} ({failed.strerror}{where}). Make "
                f"the folder writable and check its free space; the steps already saved are untouched.",
            ) from error


def _failed_write(error: BaseException) -> OSError | None:
    """The failed system call behind an error: the error itself when it is an OSError, or the one a
    tensorstore ValueError names (a full disk: "RESOURCE_EXHAUSTED: ... No space left on device
    [os_error_code='28']"); None for any other error (e.g. Orbax's TimeoutError of a barrier)."""
    if isinstance(error, OSError):
        return error if error.errno is not None else None
    code = _OS_ERROR_CODE.search(str(error)) if isinstance(error, ValueError) else None
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


class _FailedWriteRecords(logging.Filter):
    """Leaves out the records Orbax logs, each with its traceback and several per failure, of a
    failed write: the Checkpointer raises that failure once (`_writing`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or _failed_write(error) is None or f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_failed_writes() -> None:
    """Leaves out, for the life of the process, what Orbax prints of a failed write besides the
    error it raises: absl's records of it (`_FailedWriteRecords`), and the RuntimeError("Event
    loop is closed") that tensorstore reports for each read or write ending after Orbax closed the
    event loop waiting for it (which it does once one of them has failed). Installed once."""
    absl = logging.getLogger("absl")  # Orbax logs through absl
    if not any(isinstance(f, _FailedWriteRecords) for f in absl.filters):
        absl.addFilter(_FailedWriteRecords())
    hook = sys.unraisablehook
    if getattr(hook, "_drops_closed_loop_callbacks", False):
        return

    def unraisable(info) -> None:
        closed_loop = isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"
        if not (closed_loop and info.object is None):  # tensorstore's callback names no object
            hook(info)

    unraisable._drops_closed_loop_callbacks = True
    sys.unraisablehook = unraisable


def _quiet_abandoned_operations() -> None:
    """Leaves out, from a failed write on, what asyncio and Python report of the operations Orbax
    abandoned when it failed (a task of the event loop it closed, a coroutine it never awaited) as
    they are collected, mostly at exit: the failure has been raised, they say nothing more."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def _write_checksums(step_dir: pathlib.Path) -> None:
    """Writes step_dir/checksums.json, the sha256 of every other file under step_dir, atomically."""
    write_atomically(step_dir / CHECKSUMS, json.dumps(file_digests(step_dir, CHECKSUMS), indent=1))


def _split_params(state) -> tuple[object, object]:
    """(params, state with params None) of a dataclass with a `params` field or a dict with "params"."""
    if isinstance(state, Mapping) and "params" in state:
        return state["params"], {**state, "params": None}
    if dataclasses.is_dataclass(state) and any(f.name == "params" for f in dataclasses.fields(state)):
        return state.params, dataclasses.replace(state, params=None)
    raise TypeError(
        f"Cannot find the parameters of a {type(state).__name__}: pass a dataclass with a `params` "
        f"field (e.g. a flax.struct.dataclass TrainState) or a dict with a 'params' key."
    )


def _join_params(rest, params):
    """Inverse of `_split_params`."""
    if isinstance(rest, Mapping):
        return {**rest, "params": params}
    return dataclasses.replace(rest, params=params)


def _abstract(tree):
    """ShapeDtypeStructs of `tree`'s leaves; a leaf without a sharding goes to the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default), tree
    )


def _stored_shape(leaf) -> tuple[int, ...]:
    """The shape written to disk: a typed PRNG key is stored as its uint32 key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, leaf).shape
    return tuple(leaf.shape)


def _differences(saved: dict, wanted: dict, limit: int = 5) -> list[str]:
    """Readable differences between flat {path: saved metadata} and {path: ShapeDtypeStruct}."""

    def listing(what: str, paths: list[str]) -> str:
        more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
        return f"{len(paths)} {what}: {', '.join(paths[:limit])}{more}"

    missing = [path for path in wanted if path not in saved]
    unexpected = [path for path in saved if path not in wanted]
    reshaped = [
        f"{path} saved {tuple(saved[path].shape)} requested {_stored_shape(leaf)}"
        for path, leaf in wanted.items()
        if path in saved and getattr(saved[path], "shape", None) is not None
        and tuple(saved[path].shape) != _stored_shape(leaf)
    ]
    problems = []
    if missing:
        problems.append(listing("requested arrays not in the checkpoint", missing))
    if unexpected:
        problems.append(listing("saved arrays not requested", unexpected))
    if reshaped:
        problems.append(listing("shapes differ", reshaped))
    return problems


def _check_json(data_state: dict | None) -> None:
    """Raises before anything is written when the data state cannot be stored as JSON."""
    try:
        json.dumps(data_state)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"data_state must be JSON-serialisable (a data iterator's get_state() dict): {error}."
        ) from None
