"""Ring implementation of one CMCL direction: columns travel, memory O(local x block).

Runs inside ``shard_map`` over the batch axes. Each device keeps its local anchors [b, d]; the
local column block [n, d] (with owners and validity) is passed around the ring of the
``num_shards`` batch devices by ``ppermute`` inside a ``lax.scan``. A streaming (online)
logsumexp accumulates, per anchor, the logsumexp over all valid columns and over the anchor's
positive columns, so no [b, global columns] matrix ever exists.

Autodiff through such a scan would store every step's [b, n] logits. Instead the two logsumexps
have a hand-written VJP (``jax.custom_vjp``) that keeps only the anchors, the local block and the
two [b] logsumexps, and recomputes each block in a second trip around the ring. In the backward
trip the column gradient travels with its block and one last ``ppermute`` brings it home.

Gradients of lse_all - lse_pos w.r.t. logits l[a, c] are the familiar softmax differences:
  d/dl[a, c] = g_all[a] * softmax_valid(l[a])[c] + g_pos[a] * softmax_pos(l[a])[c]
(g_all, g_pos: cotangents of the two logsumexps; for the loss g_pos = -g_all on valid anchors)
and l = (anchors @ columns.T) * inv_tau gives the anchor, column and inv_tau gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Same masked-logit fill as contrastive.FILL (large, finite: see there).
FILL = -1e30


def _varying(x, axes):
  """Marks ``x`` as varying over ``axes`` (scan carries must have one vma type)."""
  aval = jax.typeof(x)
  # jax 0.10 keeps the varying axes in ``manual_axis_type``; older releases had ``vma``.
  vma = aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else aval.vma
  missing = tuple(a for a in axes if a not in vma)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _block(anchors, emb, owner, valid, anchor_ids, inv_tau):
  """Raw cosines, logits, valid and positive masks of local anchors x one column block."""
  raw = jnp.dot(anchors, emb.T, preferred_element_type=jnp.float32)
  logits = raw * inv_tau
  v = jnp.broadcast_to(valid[None, :], logits.shape)
  p = v & (owner[None, :] == anchor_ids[:, None])
  return raw, logits, v, p


def _online_lse(m, s, logits, mask):
  """One streaming logsumexp update of (running max m [b], scaled sum s [b]) with a block."""
  x = jnp.where(mask, logits, FILL)
  m_new = jnp.maximum(m, jnp.max(x, axis=-1))
  s_new = s * jnp.exp(m - m_new) + jnp.sum(jnp.where(mask, jnp.exp(x - m_new[:, None]), 0.0), -1)
  return m_new, s_new


def _lse(m, s):
  return m + jnp.log(jnp.where(s > 0, s, 1.0))


def _make_ring_lse(axes, num_shards):
  """The custom-VJP function (closes over the static ring description)."""
  perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]
  shift = lambda tree: jax.lax.ppermute(tree, axes, perm)

  def forward(anchors, emb, inv_tau, anchor_ids, owner, valid):
    b = anchors.shape[0]
    fill = _varying(jnp.full((b,), FILL, jnp.float32), axes)
    zero = _varying(jnp.zeros((b,), jnp.float32), axes)
    acc = dict(m_all=fill, s_all=zero, m_pos=fill, s_pos=zero, all_sum=zero, all_count=zero,
               pos_sum=zero, pos_count=zero)

    def accumulate(acc, block):
      _, logits, v, p = _block(anchors, *block, anchor_ids, inv_tau)
      m_all, s_all = _online_lse(acc["m_all"], acc["s_all"], logits, v)
      m_pos, s_pos = _online_lse(acc["m_pos"], acc["s_pos"], logits, p)
      return dict(
          m_all=m_all, s_all=s_all, m_pos=m_pos, s_pos=s_pos,
          all_sum=acc["all_sum"] + jnp.sum(jnp.where(v, logits, 0.0), -1),
          all_count=acc["all_count"] + jnp.sum(v, -1).astype(jnp.float32),
          pos_sum=acc["pos_sum"] + jnp.sum(jnp.where(p, logits, 0.0), -1),
          pos_count=acc["pos_count"] + jnp.sum(p, -1).astype(jnp.float32))

    def step(carry, _):
      block, acc = carry
      block = shift(block)  # Only num_shards - 1 transfers: the own block was done first.
      return (block, accumulate(acc, block)), None

    block = (emb, owner, valid)
    acc = accumulate(acc, block)
    (_, acc), _ = jax.lax.scan(step, (block, acc), None, length=num_shards - 1)
    lse_all, lse_pos = _lse(acc["m_all"], acc["s_all"]), _lse(acc["m_pos"], acc["s_pos"])
    stats = dict(max_all=acc["m_all"], max_pos=acc["m_pos"], all_sum=acc["all_sum"],
                 all_count=acc["all_count"], pos_sum=acc["pos_sum"], pos_count=acc["pos_count"])
    return lse_all, lse_pos, stats

  @jax.custom_vjp
  def ring_lse(anchors, emb, inv_tau, anchor_ids, owner, valid):
    return forward(anchors, emb, inv_tau, anchor_ids, owner, valid)

  def ring_lse_fwd(anchors, emb, inv_tau, anchor_ids, owner, valid):
    lse_all, lse_pos, stats = forward(anchors, emb, inv_tau, anchor_ids, owner, valid)
    residuals = (anchors, emb, inv_tau, anchor_ids, owner, valid, lse_all, lse_pos)
    return (lse_all, lse_pos, stats), residuals

  def ring_lse_bwd(residuals, cotangents):
    anchors, emb, inv_tau, anchor_ids, owner, valid, lse_all, lse_pos = residuals
    g_all, g_pos, _ = cotangents  # The statistics are metrics: no gradient.

    def backward_block(d_anchors, d_inv_tau, block, d_emb):
      emb_b, owner_b, valid_b = block
      raw, logits, v, p = _block(anchors, emb_b, owner_b, valid_b, anchor_ids, inv_tau)
      # where() (not multiplication) so the overflowing exp of an anchor with an empty mask
      # (lse = FILL) never reaches the result.
      g = (g_all[:, None] * jnp.where(v, jnp.exp(logits - lse_all[:, None]), 0.0)
           + g_pos[:, None] * jnp.where(p, jnp.exp(logits - lse_pos[:, None]), 0.0))
      d_anchors = d_anchors + jnp.dot(g, emb_b.astype(jnp.float32)) * inv_tau
      d_emb = d_emb + jnp.dot(g.T, anchors.astype(jnp.float32)) * inv_tau
      d_inv_tau = d_inv_tau + jnp.sum(g * raw)
      return d_anchors, d_inv_tau, d_emb

    def step(carry, _):
      block, d_emb, d_anchors, d_inv_tau = carry
      block, d_emb = shift((block, d_emb))  # The block's gradient travels with it.
      d_anchors, d_inv_tau, d_emb = backward_block(d_anchors, d_inv_tau, block, d_emb)
      return (block, d_emb, d_anchors, d_inv_tau), None

    d_anchors = _varying(jnp.zeros(anchors.shape, jnp.float32), axes)
    d_emb = _varying(jnp.zeros(emb.shape, jnp.float32), axes)
    d_inv_tau = _varying(jnp.zeros((), jnp.float32), axes)
    block = (emb, owner, valid)
    d_anchors, d_inv_tau, d_emb = backward_block(d_anchors, d_inv_tau, block, d_emb)
    (_, d_emb, d_anchors, d_inv_tau), _ = jax.lax.scan(
        step, (block, d_emb, d_anchors, d_inv_tau), None, length=num_shards - 1)
    # After num_shards - 1 shifts a device holds the gradient of its neighbour's block: one more.
    d_emb = shift(d_emb)
    return (d_anchors.astype(anchors.dtype), d_emb.astype(emb.dtype),
            d_inv_tau.astype(inv_tau.dtype), None, None, None)

  ring_lse.defvjp(ring_lse_fwd, ring_lse_bwd)
  return ring_lse


def ring_direction(anchors, anchor_ids, anchor_valid, cols, inv_tau, *, axes, num_shards, finish):
  """One CMCL direction by the ring; returns ``finish``'s local sums (see contrastive.py).

  anchors: [b, d] local anchors; anchor_ids: [b] int32 global row ids; anchor_valid: [b] bool;
  cols: contrastive.Columns of THIS device's columns ([n, d], [n], [n]); inv_tau: scalar,
  invariant across devices; axes: the batch mesh axes; num_shards: their total size.
  """
  ring_lse = _make_ring_lse(tuple(axes), num_shards)
  # Varying copy of the replicated temperature: its per-device cotangent is then summed over
  # the devices by the transpose of pcast (a psum), exactly once.
  inv_tau_v = _varying(jnp.asarray(inv_tau, jnp.float32), axes)
  lse_all, lse_pos, stats = ring_lse(anchors, cols.emb, inv_tau_v, anchor_ids, cols.owner,
                                     cols.valid)
  stats = jax.tree.map(jax.lax.stop_gradient, stats)
  return finish(lse_all, lse_pos, anchor_valid, stats)
