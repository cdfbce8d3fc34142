"""What a cell's own `scan` must equal, and a summary of a scan's values and gradients."""

import jax
import jax.numpy as jnp


def scan_of_apply(cell, params, carry, xs, unroll):
  """`jax.lax.scan` of the cell's step: what a cell's own `scan` must equal."""

  def body(c, x_t):
    c, y_t = cell.apply(params, c, x_t)
    return c, (y_t, c)

  carry, (outputs, carries) = jax.lax.scan(body, carry, xs, unroll=unroll)
  return carry, outputs, carries


def scan_summary(scan, params, carry, xs, wrt=(0, 1, 2)):
  """A scalar of every output of a scan, each weighted differently, and its gradients
  with respect to `wrt`: the parameters, the initial carry and the inputs."""

  def summary(params, carry, xs):
    final, outputs, carries = scan(params, carry, xs)
    leaves = jax.tree.leaves((final, outputs, carries))
    return sum(jnp.sum(jnp.sin((i + 1.0) * leaf)) for i, leaf in enumerate(leaves))

  return jax.value_and_grad(summary, argnums=wrt)(params, carry, xs)
