"""Data-parallel training on MPI: `mpirun -n N npgpt train ...` makes the updates that one process makes
with the same config, the grad_accum micro-batches of every step shared out among the N ranks.

Every rank holds the whole model and draws every micro-batch of a step from the run's one RNG stream, so
it stays in step with the others and with a single process, but runs forward and backward only on its
own share: micro-batch i of k belongs to rank i * N // k (contiguous blocks; k is a multiple of N). On
the others it only advances the RNG past their dropout (GPT.skip_dropout). The gradients are then summed:

- most of the flat buffer by all-reduce, in buckets of about `bucket_mb` MB, each started as soon as the
  backward has finished the blocks it covers, so the sums travel while the backward goes on (0: one
  all-reduce after the backward); a helper thread calls into MPI meanwhile, since MPI moves data only
  inside its calls. Nothing is sent on a rank's earlier micro-batches. With two ranks a sum of two is
  exact: bit for bit what one process adds. The default of 4 MB is a bucket per block or two: PyTorch
  DDP's 25 MB suits GPU models, but on a CPU a block's backward outlasts its gradients' transfer (a
  19 MB model, 2 ranks over 1 Gbit/s: 31-97 ms per step waited for the sums with 1-4 MB buckets,
  176 ms with 25 MB, 198-267 ms without overlap; busy 2-core machine);
- the embeddings and the layernorm gains and biases gather their gradient one token at a time, in place,
  so one process's result depends on the order of every token of the step. Each rank records those
  additions (GPT.backward's `defer`) and replays them onto the sums of the ranks before it, passed down
  a chain of ranks; the last one broadcasts the result: one process's additions, in its order.

Rank 0 alone touches the run dir (reads, prints, logs, checkpoints) and broadcasts what the others need.
An error that every rank meets is raised on every rank and reported by rank 0; one that a single rank
meets is reported by it and aborts the job (MPI_Abort); a rank that dies is ended with the job by the
launcher. No rank waits forever. Messages between ranks are JSON and raw arrays, never pickles.

mpi4py is imported only when an MPI launcher started this process as one of several ranks.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from .errors import NpgptError
from .params import param_shapes

# what launchers put in the environment of the processes they start: Open MPI; MPICH, Intel MPI and
# Slurm's srun with PMI-2; MVAPICH; srun with PMIx (its size from Slurm)
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
_POLL_TAG = 1899  # no message carries it: probing for it only advances MPI


def _env_int(names) -> int | None:
    for name in names:
        raw = os.environ.get(name, "")
        if raw.isdigit():
            return int(raw)
    return None


def launched_rank() -> int:
    """This process's rank as its MPI launcher numbered it (0 when it was not started by one): read from
    the environment, without importing MPI (the CLI reports errors on rank 0 alone)."""
    return _env_int(_RANK_VARS) or 0


def launched_size() -> int:
    """How many ranks the MPI launcher that started this process started (1 when none did)."""
    size = _env_int(_SIZE_VARS)
    if size is None and "PMIX_RANK" in os.environ:
        size = _env_int(("SLURM_STEP_NUM_TASKS",))
    return size or 1


def join(bucket_mb: float = 4.0) -> DataParallel | None:
    """The data-parallel job this process is a rank of, or None when an MPI launcher did not start it
    with more than one rank (then MPI is never imported)."""
    size = launched_size()
    if size < 2:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        e = NpgptError(f"started by an MPI launcher as one of {size} ranks, but mpi4py is not installed: "
                       f"pip install 'npgpt[mpi]'")
        e.rank = launched_rank()
        raise e from None
    if MPI.COMM_WORLD.Get_size() != size:  # each process alone in its own world: N trainings, not one
        e = NpgptError(f"the launcher started {size} ranks but MPI sees {MPI.COMM_WORLD.Get_size()}: mpi4py is "
                       f"bound to another MPI ({' '.join(MPI.Get_library_version().split()[:3])}); start npgpt "
                       f"with that MPI's mpirun")
        e.rank = launched_rank()
        raise e
    return DataParallel(MPI, bucket_mb)


def end_unjoined(code: int):
    """Called as a process exits with an error: if an MPI launcher started it as one of several ranks
    and it never joined the job (a bad argument, refused before `join`), join only to abort the whole job.
    The other ranks would otherwise wait in MPI_Init for it forever: MPICH's launcher does not notice a
    rank that ends before it connects. Nothing happens without a launcher or once MPI was started."""
    if launched_size() < 2 or "mpi4py.MPI" in sys.modules:
        return
    try:
        from mpi4py import MPI
    except ImportError:  # reported already: the launcher cannot be joined from here
        return
    MPI.COMM_WORLD.Abort(code)


def micro_batches(n: int, k: int) -> list[slice]:
    """A step's n examples as k contiguous micro-batches (micro-batch i: from i * n // k), the same for
    any number of ranks; when n < k (an epoch's last, short batch) some are empty."""
    return [slice(i * n // k, (i + 1) * n // k) for i in range(k)]


def ordered(name: str) -> bool:
    """Parameters whose gradient one token at a time is added in place: summed down the chain of ranks."""
    return name in ("wte.weight", "wpe.weight") or "ln_" in name


class DataParallel:
    """This process's place in an MPI job of `size` ranks, and the collectives that training needs."""

    def __init__(self, MPI, bucket_mb: float = 4.0):
        if not bucket_mb >= 0:
            raise NpgptError(f"bucket_mb must be >= 0, got {bucket_mb}")
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.root = self.rank == 0
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.host = socket.gethostname()
        self.layout = None
        self.wait_s = 0.0  # seconds the last step spent waiting for its sums after its backward
        self.sending = threading.Event()  # set while buckets are in flight
        if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            self._stop = False
            poller = threading.Thread(target=self._poll, daemon=True)
            poller.start()
            atexit.register(self._end_poll, poller)  # runs before mpi4py's MPI_Finalize (registered earlier)

    def _poll(self):
        """While buckets are in flight: call into MPI every 0.2 ms. MPI moves data only inside its calls,
        so without these a non-blocking all-reduce over TCP sends a socket buffer's worth per block of the
        backward; BLAS and the kernels release the GIL, so this thread runs beside them."""
        while not self._stop:
            if self.sending.wait(0.1):
                self.comm.Iprobe(tag=_POLL_TAG)
                time.sleep(0.0002)

    def _end_poll(self, poller):
        self._stop = True
        poller.join(1.0)

    def owns(self, i: int, n: int) -> bool:
        """Whether item i of n (a micro-batch, an evaluation batch) is this rank's: contiguous blocks."""
        return i * self.size // n == self.rank

    # ------------------------------------------------------------ errors, and what rank 0 shares
    @contextlib.contextmanager
    def guard(self):
        """Around a whole job. An NpgptError is met by every rank at the same point (a check of shared
        values, or raised by `together`): re-raised, marked on the other ranks so that rank 0 alone
        reports it (`rank` attribute). Anything else is this rank's alone (a full disk, an interrupt, a
        bug): reported, and the job aborted, since the others would wait for this rank forever."""
        try:
            yield
        except NpgptError as e:
            if not self.root:
                e.rank = self.rank
            raise
        except BaseException as e:
            what = ("interrupted" if isinstance(e, KeyboardInterrupt)
                    else str(e) if isinstance(e, OSError) else traceback.format_exc().rstrip())
            print(f"npgpt: rank {self.rank} of {self.size} (on {self.host}): {what}; aborting the job",
                  file=sys.stderr, flush=True)
            self.comm.Abort(1)
            raise

    @contextlib.contextmanager
    def together(self):
        """A block that every rank enters (with its own work in it, or none) and that fails on every rank
        when it failed on one: the first failing rank's NpgptError or OSError is raised everywhere."""
        err = None
        try:
            yield
        except (NpgptError, OSError) as e:
            err = e
        texts = self._allgather_text("" if err is None else f"rank {self.rank} of {self.size} (on {self.host}): {err}")
        failed = [(r, t) for r, t in enumerate(texts) if t]
        if not failed:
            return
        r, text = failed[0]
        if r == self.rank and self.root:
            raise err
        raise NpgptError(text) from err

    def same(self, value, what: str):
        """Raise on every rank unless every rank has the same JSON-able `value` (of `what`)."""
        texts = self._allgather_text(json.dumps(value, sort_keys=True))
        for r, t in enumerate(texts):
            if t != texts[0]:
                raise NpgptError(f"{what} differs between rank 0 and rank {r} of {self.size}")

    def share(self, obj=None):
        """Rank 0's JSON-able `obj`, on every rank."""
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.root else None
        n = np.array([0 if data is None else data.size], np.int64)
        self.comm.Bcast(n, root=0)
        buf = data.copy() if self.root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=0)
        return json.loads(buf.tobytes().decode())

    def share_arrays(self, *arrays):
        """Rank 0's contents of each array, written into every rank's."""
        for a in arrays:
            self.comm.Bcast(a, root=0)

    def sum_owned(self, values: np.ndarray) -> np.ndarray:
        """values (any shape), summed over the ranks in place and returned: entries that each rank sets
        alone and leaves 0 elsewhere (x + 0 is exact: every rank gets the owners' values bit for bit), or
        small gradients outside the flat buffer, such as a task head's (with two ranks a sum of two is
        exact: one process's accumulation bit for bit)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values

    def share_ragged(self, rows=None) -> list[list[int]]:
        """Rank 0's `rows` (lists of ints of any lengths: token sequences, masks) on every rank: the
        lengths as JSON, the values as one raw int64 array (a JSON text of every token would be 3-5
        times the bytes)."""
        lengths = self.share([len(r) for r in rows] if self.root else None)
        flat = (np.fromiter((v for r in rows for v in r), np.int64, sum(lengths)) if self.root
                else np.empty(sum(lengths), np.int64))
        self.comm.Bcast(flat, root=0)
        ends = np.cumsum(lengths)
        return [flat[e - n:e].tolist() for n, e in zip(lengths, ends)]

    def require_split(self, grad_accum: int, why: str = ""):
        """Raise unless the grad_accum micro-batches of a step can be shared out evenly among the ranks."""
        if grad_accum % self.size:
            raise NpgptError(f"grad_accum {grad_accum} counts the micro-batches of a whole step: make it a "
                             f"multiple of the {self.size} ranks (e.g. --grad_accum {self.size}){why}")

    def check_replicas(self, flat: np.ndarray):
        """The ranks' weights must be the same bits (one CRC per rank), or the run has split."""
        self.same(zlib.crc32(flat.view(np.uint8)), "the weights")

    def _allgather_text(self, text: str) -> list[str]:
        data = np.frombuffer(text.encode(), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        self.comm.Allgather(np.array([data.size], np.int64), sizes)
        out = np.empty(int(sizes.sum()), np.uint8)
        self.comm.Allgatherv(data.copy(), [out, sizes.tolist()])
        ends = np.cumsum(sizes)
        return [out[e - s:e].tobytes().decode() for s, e in zip(sizes, ends)]

    # ------------------------------------------------------------ the gradient sums of a step
    def _plan(self, model):
        """Offsets of every block's parameters in the flat buffer, and the buffers of the sums."""
        offsets, off = {}, 0
        for name, shape in model.shapes:
            offsets[name] = off
            off += int(np.prod(shape))
        self.starts = [offsets[f"h.{l}.ln_1.weight"] for l in range(model.config.n_layer)]
        self.out = np.empty_like(model.grad)  # the summed gradient
        names = [(n, s) for n, s in model.shapes if ordered(n)]
        self.chain = np.empty(sum(int(np.prod(s)) for _, s in names), model.grad.dtype)
        self.chain_views, o = {}, 0
        for n, s in names:
            size = int(np.prod(s))
            self.chain_views[n] = self.chain[o:o + size].reshape(s)
            o += size
        self.chain_slices = [(offsets[n], v.reshape(-1)) for n, v in self.chain_views.items()]
        self.layout = model.shapes

    def hooks(self, model, i: int, k: int) -> dict:
        """GPT.backward's keyword arguments for this rank's micro-batch i of k: the additions to replay
        are recorded, and the last of the rank's micro-batches starts the all-reduce bucket by bucket."""
        if self.layout is not model.shapes:
            self._plan(model)
        if i == 0 or not self.owns(i - 1, k):
            self.deferred, self.pending, self.next = [], [], model.grad.size
        last = i + 1 == k or not self.owns(i + 1, k)
        overlap = last and self.bucket_bytes > 0
        return {"defer": self.deferred, "on_block": (lambda l: self._block_done(model, l)) if overlap else None}

    def idle(self, model, i: int, k: int):
        """This rank's micro-batch i of k is empty (a step's last, short batch of examples split k ways):
        no backward, but its part in the step's sums all the same. Every rank must start the same
        all-reduces, bucket for bucket, so the blocks are reported done as a backward would."""
        on_block = self.hooks(model, i, k)["on_block"]
        if on_block is not None:
            for l in reversed(range(model.config.n_layer)):
                on_block(l)

    def _block_done(self, model, l: int):
        """Block l's gradients are complete: all-reduce what lies from its start to the last bucket's if that
        is a bucket's worth (the blocks' end, from block 0: all of them); let MPI advance the others."""
        lo = self.starts[l]
        if (self.next - lo) * model.grad.itemsize >= self.bucket_bytes or l == 0:
            self.pending.append(self.comm.Iallreduce(model.grad[lo:self.next], self.out[lo:self.next],
                                                     op=self.MPI.SUM))
            self.next = lo
            self.sending.set()
        self.MPI.Request.Testall(self.pending)

    def reduce(self, model, losses: np.ndarray) -> np.ndarray:
        """After this rank's backward passes: the step's summed gradient (a buffer of the flat buffer's
        layout, the same bits on every rank); `losses` (each micro-batch's loss / k, 0 where another
        rank's) summed over the ranks in place."""
        t0 = time.perf_counter()
        grad, h0 = model.grad, self.starts[0]
        if not self.pending:  # no overlap (bucket_mb 0): one all-reduce now
            self.comm.Allreduce(grad[h0:], self.out[h0:], op=self.MPI.SUM)
        self.sum_owned(losses)
        chain, views = self.chain, self.chain_views
        if self.root:
            chain.fill(0)
        else:
            self.comm.Recv(chain, source=self.rank - 1, tag=18)
        views["wte.weight"] += model.grads["wte.weight"]  # the LM head's products: whole, not per token
        for names, fn, args in self.deferred:
            fn(*args, *(views[n] if n else None for n in names))
        if self.rank + 1 < self.size:
            self.comm.Send(chain, dest=self.rank + 1, tag=18)
        self.comm.Bcast(chain, root=self.size - 1)
        self.MPI.Request.Waitall(self.pending)
        self.sending.clear()
        for off, v in self.chain_slices:
            self.out[off:off + v.size] = v
        self.deferred, self.pending = [], []
        self.wait_s = time.perf_counter() - t0
        return self.out

    def describe(self, model) -> str:
        """What a step sends, for the run's banner: the ring all-reduce moves 2(N-1)/N of the buffer out
        of each rank; the chain passes the ordered sums on once and broadcasts them."""
        n = model.num_params * model.flat.itemsize
        chain = sum(int(np.prod(s)) for name, s in param_shapes(model.config) if ordered(name)) * model.flat.itemsize
        reduced = n - chain
        per_rank = 2 * (self.size - 1) / self.size * reduced
        buckets = f"buckets of {self.bucket_bytes / 2 ** 20:g} MB" if self.bucket_bytes else "one all-reduce"
        return (f"gradients of {n / 1e6:,.2f} MB per step: all-reduce of {reduced / 1e6:,.2f} MB ({buckets}), "
                f"2(N-1)/N of it = {per_rank / 1e6:,.2f} MB sent per rank; {chain / 1e6:,.2f} MB of embedding "
                f"and layernorm sums passed down the chain of ranks and broadcast")

