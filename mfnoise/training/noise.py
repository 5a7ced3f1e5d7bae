"""Streaming correlated noise: row t of C^{-1} W, one step at a time, with O(bands) state.

The mechanism releases C G + Z; the optimizer sees g_t + (C^{-1} Z)_t (docs/design.md). This
module yields z_t = (C'^{-1} W)_t for W with iid N(0, 1) rows shaped like the parameters, where
C' = ``strategy.realised(dtype)`` is the strategy as its coefficients rounded to the noise dtype
define it (``strategy.stream_table(dtype)``, the only coefficients the generator uses; C' = C up to
that rounding). No normalisation here: ``mfnoise.training.transforms.dp_aggregate`` scales by
``strategy.noise_sensitivity(p, dtype)``, a proven bound on sens(C', p). The generator knows no
strategy family: it runs the recurrence the table's kind names (``StreamTable``; each family
chooses its kind and coefficients, docs/design.md), keeping m = ``strategy.state_arrays()``
parameter-sized state arrays:

==============  ========================================================  ==============
kind            recurrence (state after step t)                           state arrays m
==============  ========================================================  ==============
independent     z_t = w_t                                                 0
output          z_t = s_t (w_t - sum_{j=1..m} a_{t,j} z_{t-j})            m outputs z
input           z_t = sum_{j=0..m} r_{t,j} w_{t-j}                        m inputs w
buffers-input   z_t = w_t + sum_i omega'_i s_i;  s_i <- theta'_i s_i + w_t  m buffers s
buffers-output  z_t = w_t - sum_i omega_i s_i;  s_i <- theta_i s_i + z_t    m buffers s
==============  ========================================================  ==============

"output" is BandMF's recurrence ("Multi-Epoch Matrix Factorization Mechanisms for Private Machine
Learning", Choquette-Choo et al. 2023, arXiv:2211.06530), a_{t,j} = C'[t, t - j]; "input" runs a
banded C^{-1} (BISR, "Banded Square Root Matrix Factorization for Differentially Private Model
Training", Kalinin & Lampert 2024, arXiv:2405.13763); "buffers-input" runs C^{-1} = BLT(theta',
omega') and "buffers-output" solves C z = w for C = BLT(theta, omega) ("Efficient and
Near-Optimal Noise Generation for Streaming Differential Privacy", Dvijotham et al. 2024,
arXiv:2404.16706).

The division by C[t, t] is a multiplication by s_t = 1 / C[t, t] rounded on the host (so C'[t, t]
= 1 / s_t).

Noise dtype: by default each parameter's dtype (float32 params keep float32 state); ``dtype=``
sets it for all (e.g. jnp.float32 state for bfloat16 params; the caller casts the noise when it
adds it). Dtypes coarser than float32 are refused for every strategy but C = I
(``Strategy.is_identity``): their rounding at every step of a recurrence is not a small
perturbation of C. State memory is exactly m x (number of parameters) x itemsize of the noise
dtype. A dense or full-Toeplitz C needs the whole history (m = n - 1 parameter-sized arrays):
allowed, but only sensible for small models.

Determinism: w_t for leaf i (in ``jax.tree_util`` flatten order) is
``jax.random.normal(fold_in(fold_in(key, i), t), leaf.shape, noise dtype)``, so z_t is a pure
function of (key, t, state). Saving ``NoiseState`` and resuming gives bit-identical noise, and with
JAX's partitionable threefry (the default) the values do not depend on how arrays are sharded.

Ring buffers: the m state arrays of a leaf are stacked into one array of shape (m, *leaf.shape);
the array written at step t is slot t mod m (``dynamic_update_slice``, in place when the state is
donated), and the m coefficients are permuted to match the slots, so no roll or gather of
parameter-sized data ever happens. Compiled temporaries of one jitted, donated step (XLA:CPU):
JAX's threefry sampler alone needs 3 parameter-sized temporaries (DP-SGD's independent noise has
them too); the "output" and "input" kinds add 2 (the contraction's result and z), the BLT kinds
add 1. The state is never copied. Donate the state (``donate_argnums``) to get this.

Past the end: the strategy is defined (and its sensitivity computed) for steps 0..n-1. Asking for
step t >= n sets ``NoiseState.exhausted`` and makes the noise NaN (so it cannot silently reach the
parameters); ``check(state)`` raises on the host, and eager (un-jitted) calls raise at once. The
last row is never reused.

Sharding: by default each state array takes its parameter's sharding (PartitionSpec (None, *spec)).
With ``state_sharding="all_devices"`` (params replicated over a data-parallel mesh) each state array
is split across every device of the mesh along its first divisible dimension (ZeRO style).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.sharding import NamedSharding, PartitionSpec

from mfnoise.strategies.base import Strategy, StreamTable


class NoiseState(NamedTuple):
    """State of a noise generator.

    Attributes:
      step: int32 scalar, the next step t.
      buffers: pytree shaped like the params; each leaf (m, *param.shape) in the noise dtype
        (``None`` leaves for stateless families).
      exhausted: bool scalar; True once a step t >= n was requested (noise is NaN from then on).
    """

    step: jax.Array
    buffers: Any
    exhausted: jax.Array


class ExhaustedError(RuntimeError):
    """A noise step past the strategy's n was requested."""


# -- the noise dtype -------------------------------------------------------------------------------

LOW_PRECISION_MANTISSA = 23  # noise dtypes with fewer mantissa bits (bfloat16, float16) run only C = I


def check_noise_dtype(strategy: Strategy, dtype: Any) -> np.dtype:
    """``dtype`` as a numpy dtype, or a TypeError if the strategy's noise cannot run in it."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"noise needs a floating-point dtype, got dtype {dtype}")
    if jnp.finfo(dtype).nmant < LOW_PRECISION_MANTISSA and not strategy.is_identity:
        raise TypeError(
            f"noise dtype {dtype} is too coarse for the {strategy.family} recurrence (its coefficients and "
            f"state would be rounded to {jnp.finfo(dtype).nmant + 1} bits each step); pass "
            "noise_dtype=jnp.float32 (dp_aggregate / correlated_noise / noise.generator(dtype=...)): the "
            f"state stays float32 and the noise is cast to {dtype} when it is added"
        )
    return np.dtype(dtype)


# -- sharding helpers ------------------------------------------------------------------------------


def _explicit_sharding(x: Any) -> NamedSharding | None:
    """x's NamedSharding when its mesh has Explicit axes (sharding in types), else None."""
    try:
        s = jax.typeof(x).sharding
    except Exception:
        return None
    if isinstance(s, NamedSharding) and not s.mesh.empty:
        if any(t == jax.sharding.AxisType.Explicit for t in s.mesh.axis_types):
            return s
    return None


def _concrete_sharding(x: Any) -> NamedSharding | None:
    if isinstance(x, Tracer):
        return _explicit_sharding(x)
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def _stacked_sharding(s: NamedSharding | None, ndim: int) -> NamedSharding | None:
    if s is None:
        return None
    spec = tuple(s.spec) + (None,) * (ndim - len(s.spec))
    return NamedSharding(s.mesh, PartitionSpec(None, *spec))


def _all_devices_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Splits the first dimension divisible by the mesh size across every mesh axis (ZeRO)."""
    size = mesh.devices.size
    spec: list[Any] = [None] * (len(shape) + 1)
    for d, dim in enumerate(shape):
        if dim % size == 0:
            spec[d + 1] = tuple(mesh.axis_names)
            break
    return NamedSharding(mesh, PartitionSpec(*spec))


# -- the generator ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseGenerator:
    """Streams (C^{-1} W)_t for a strategy C; see the module docstring.

    Use: ``state = gen.init(params)``; then, inside or outside ``jax.jit``,
    ``noise, state = gen.next(state, params_like)``. ``params_like`` gives the noise's shapes,
    dtypes and (with Explicit mesh axes) shardings; it may be the updates.
    """

    strategy: Strategy
    key: jax.Array
    m: int
    state_sharding: str = "params"
    mesh: jax.sharding.Mesh | None = None
    dtype: np.dtype | None = None
    _tables: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.strategy.n

    @property
    def state_arrays(self) -> int:
        """m: state arrays per parameter (state bytes = m x params x itemsize of the noise dtype)."""
        return self.m

    def noise_dtype(self, x: Any) -> np.dtype:
        """The dtype of the noise and state for a parameter x: ``dtype`` if given, else x's."""
        return check_noise_dtype(self.strategy, self.dtype if self.dtype is not None else x.dtype)

    def table(self, dtype: Any) -> StreamTable:
        """The coefficients streamed in ``dtype`` (``strategy.stream_table(dtype)``, built once)."""
        dtype = np.dtype(dtype)
        if dtype not in self._tables:
            table = self.strategy.stream_table(dtype)
            if table.m != self.m:
                raise AssertionError(f"stream table has m={table.m}, the generator m={self.m}")
            self._tables[dtype] = table
        return self._tables[dtype]

    def state_bytes(self, params: Any) -> int:
        """Exact bytes of the buffers ``init(params)`` allocates."""
        return sum(self.m * math.prod(x.shape) * self.noise_dtype(x).itemsize for x in jax.tree.leaves(params))

    # -- init ------------------------------------------------------------------------------------
    def init(self, params: Any) -> NoiseState:
        """Zero state shaped like ``params`` (arrays or ShapeDtypeStructs), step 0.

        Called outside jit with sharded params (or under jit with Explicit mesh axes), each state
        array takes its parameter's sharding, or is split across all devices with
        ``state_sharding="all_devices"``. Under jit with Auto axes, pass ``out_shardings``.
        """
        m = self.m

        def leaf_state(x: Any) -> Any:
            if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating):
                raise TypeError(f"noise needs floating-point parameters, got dtype {jnp.dtype(x.dtype)}")
            dtype = self.noise_dtype(x)
            if m == 0:
                return None
            shape = (m, *x.shape)
            sharding = self._state_sharding_for(x)
            if sharding is not None and not isinstance(x, Tracer):
                return jnp.zeros(shape, dtype, device=sharding)
            z = jnp.zeros(shape, dtype, out_sharding=sharding) if _explicit_sharding(x) else jnp.zeros(shape, dtype)
            return z if sharding is None else jax.lax.with_sharding_constraint(z, sharding)

        buffers = jax.tree.map(leaf_state, params)
        return NoiseState(jnp.zeros((), jnp.int32), buffers, jnp.zeros((), bool))

    def _state_sharding_for(self, x: Any) -> NamedSharding | None:
        if self.state_sharding == "all_devices":
            mesh = self.mesh
            if mesh is None:
                s = _concrete_sharding(x)
                mesh = s.mesh if s is not None else None
            if not isinstance(mesh, jax.sharding.Mesh):
                raise ValueError('state_sharding="all_devices" needs a mesh (pass mesh= or sharded params)')
            return _all_devices_sharding(mesh, tuple(x.shape))
        return _stacked_sharding(_concrete_sharding(x), len(x.shape))

    # -- step ------------------------------------------------------------------------------------
    def next(self, state: NoiseState, params_like: Any) -> tuple[Any, NoiseState]:
        """(z_t, state after step t) for t = state.step; z_t shaped like ``params_like``.

        Jittable. For t >= n the noise is NaN and ``exhausted`` is set (raises at once if t is
        concrete, i.e. outside jit).
        """
        t = state.step
        if not isinstance(t, Tracer) and int(t) >= self.n:
            raise ExhaustedError(f"noise step {int(t)} requested but the strategy has only n={self.n} steps")
        past_end = t >= self.n
        leaves, treedef = jax.tree.flatten(params_like)
        buf_leaves = treedef.flatten_up_to(state.buffers) if self.m else [None] * len(leaves)
        outs, new_bufs = [], []
        for i, (x, buf) in enumerate(zip(leaves, buf_leaves)):
            z, nb = self._leaf_step(i, t, past_end, x, buf)
            outs.append(z)
            new_bufs.append(nb)
        new_state = NoiseState(
            t + 1,
            jax.tree.unflatten(treedef, new_bufs) if self.m else state.buffers,
            state.exhausted | past_end,
        )
        return jax.tree.unflatten(treedef, outs), new_state

    def _w(self, i: int, t: jax.Array, x: Any, dtype: Any) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(self.key, i), t)
        sharding = _explicit_sharding(x)
        if sharding is not None:
            return jax.random.normal(key, x.shape, dtype, out_sharding=sharding)
        return jax.random.normal(key, x.shape, dtype)

    def _leaf_step(self, i: int, t: jax.Array, past_end: jax.Array, x: Any, buf: Any) -> tuple[jax.Array, Any]:
        dtype = self.noise_dtype(x)
        if buf is not None and jnp.dtype(buf.dtype) != dtype:
            raise TypeError(
                f"noise state has dtype {jnp.dtype(buf.dtype)} but the noise dtype for this {jnp.dtype(x.dtype)} "
                f"parameter is {dtype}: build the generator with dtype={jnp.dtype(buf.dtype).name} "
                "(noise_dtype= in dp_aggregate / correlated_noise), as when the state was made"
            )
        plan = self.table(dtype)
        m = plan.m
        # NaN past the end: multiplying w by a scalar is exact for 1.0 and fuses with the sampling.
        poison = jnp.where(past_end, jnp.array(jnp.nan, dtype), jnp.array(1.0, dtype))
        w = self._w(i, t, x, dtype) * poison
        if plan.kind == "independent":
            return w, None
        table = jnp.asarray(plan.table, dtype)  # exact: the entries are representable in dtype
        if plan.kind in ("buffers-input", "buffers-output"):
            assert buf is not None  # m >= 1 buffers, made by init
            decay = table[0].reshape((m,) + (1,) * w.ndim)
            if plan.kind == "buffers-output":  # C' z = w: the buffers are fed the outputs
                z = w - _contract(table[1], buf)
                return z, decay * buf + z[None]
            z = w + _contract(table[1], buf)
            # The weighted sum is a dot (``_contract``), and adding 0 * z[0] (exact: +-0, NaN only if
            # z is already NaN) makes the in-place buffer update depend on it: XLA orders the update
            # after the dot's reads and copies no buffer (with an elementwise sum, or without the
            # dependency, XLA:CPU copied all m buffers every step: at 5M parameters and m = 4,
            # 40 MB more temporaries, jax 0.10). (Not with Explicit mesh axes, where slicing a
            # sharded dimension is not allowed.)
            if z.size and _explicit_sharding(x) is None:
                w_dep = w + z[(0,) * z.ndim] * jnp.zeros((), dtype)
            else:
                w_dep = w
            return z, decay * buf + w_dep[None]
        row = table[jnp.minimum(t, table.shape[0] - 1)]  # (m + 1,) coefficients of lags 0..m
        # Output kind: row[0] is the reciprocal 1 / C[t, t] rounded on the host, a multiplier (not a
        # division, which XLA may rewrite): the same rounding on every device layout, and the value
        # the realised strategy is built from. Input kind: row[0] = C^{-1}[t, t].
        scale = row[0]
        if m == 0:
            return w * scale, buf
        assert buf is not None  # m >= 1 state arrays, made by init
        slot = jnp.arange(m)
        lag = jnp.mod(t - 1 - slot, m) + 1  # slot s holds the value of step t - lag[s]
        coef = jnp.where(t - lag >= 0, row[lag], jnp.zeros((), dtype))
        write = jnp.mod(t, m)
        if plan.kind == "output":
            z = (w - _contract(coef, buf)) * scale
            stored = z
        else:  # "input"
            z = scale * w + _contract(coef, buf)
            stored = w
        new = jax.lax.dynamic_update_index_in_dim(buf, stored.astype(dtype), write, 0)
        return z, new


def _contract(coef: jax.Array, buf: jax.Array) -> jax.Array:
    """sum_s coef[s] * buf[s] as a dot (ring-buffer recurrences and the buffer kinds).

    A dot is never fused into its consumer, so the in-place update of the state (the ring's
    ``dynamic_update_slice`` of z, the buffers' theta s + w) reads only the dot's result, not other
    rows of the state it writes: XLA then needs no copy of the state (an elementwise sum here made
    XLA copy the whole state every step).
    Precision HIGHEST: on GPUs and TPUs a float32 dot may otherwise run in TF32 / bfloat16 passes,
    rounding the coefficients and the state to 10 or 8 bits, so the noise would no longer be the
    realised strategy's (a no-op on CPU).
    """
    return jnp.tensordot(coef, buf, axes=1, precision=jax.lax.Precision.HIGHEST)


def generator(
    strategy: Strategy,
    key: jax.Array | int,
    *,
    state_sharding: str = "params",
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = None,
) -> NoiseGenerator:
    """A streaming generator of (C'^{-1} W)_t, C' = ``strategy.realised(dtype)`` (C rounded to the noise dtype).

    Args:
      strategy: any ``Strategy`` (every family streams; it says how in ``stream_table``).
      key: a JAX PRNG key (typed or raw uint32) or an int seed.
      state_sharding: "params" (each state array sharded like its parameter) or "all_devices"
        (ZeRO style: split across every device of ``mesh``, for replicated params).
      mesh: the mesh for "all_devices" (default: the params' mesh).
      dtype: the noise dtype (state, coefficients, samples and the returned noise); None: each
        parameter's dtype. Dtypes coarser than float32 (bfloat16, float16) are refused unless
        C = I: pass jnp.float32 for bfloat16 parameters and cast the noise.

    State memory: ``strategy.state_arrays()`` x params x itemsize.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"expected a Strategy, got {type(strategy).__name__}")
    if state_sharding not in ("params", "all_devices"):
        raise ValueError(f'state_sharding must be "params" or "all_devices", got {state_sharding!r}')
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    if dtype is not None:
        dtype = check_noise_dtype(strategy, dtype)
    return NoiseGenerator(strategy, key, strategy.state_arrays(), state_sharding, mesh, dtype)


def check(state: Any) -> None:
    """Raises ExhaustedError if any NoiseState inside ``state`` stepped past its strategy's n.

    Call it on the host (e.g. when logging or checkpointing) on a jitted training loop's state.
    """
    for s in _noise_states(state):
        if bool(jax.device_get(s.exhausted)):
            raise ExhaustedError(
                f"noise generator stepped past the strategy's last step (state step {int(jax.device_get(s.step))});"
                " its noise is NaN from then on"
            )


def _noise_states(tree: Any) -> list[NoiseState]:
    found = []

    def visit(x: Any) -> Any:
        if isinstance(x, NoiseState):
            found.append(x)
        return x

    jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, NoiseState))
    return found
