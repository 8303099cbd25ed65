"""Vision Transformers: attention heads paired across models and merged within pairs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zipjax
from zipjax import match, models
from zipjax import spec as S
from zipjax._src import spec as spec_src
from zipjax._src import stats as stats_lib
from tests import zoo

WIDTH, DEPTH, HEADS, MLP = 32, 2, 4, 48


@pytest.fixture(scope="module")
def vit():
  model, spec = models.vit(WIDTH, DEPTH, HEADS, MLP, patch=8)
  x = np.random.default_rng(0).standard_normal((8, 16, 16, 3)).astype(np.float32)
  return model, spec, x, zoo.init(model, x, seed=0), zoo.init(model, x, seed=1)


def _heads_permuted(spec, variables, seed=3):
  """A copy of ``variables`` with every block's heads permuted (not the identity) and the
  features within each head permuted; returns it and each block's head order."""
  key = jax.random.key(seed)
  perms = spec_src.random_permutations(spec, key)
  size = WIDTH // HEADS
  order = {}
  for i in range(DEPTH):
    qk, vo = perms[f"block{i}_qk"], perms[f"block{i}_vo"]
    order[i] = qk[::size] // size
    np.testing.assert_array_equal(order[i], vo[::size] // size)  # one order per layer
  assert any((o != np.arange(HEADS)).any() for o in order.values()), "pick another seed"
  return zipjax.permute_spaces(variables, spec, perms=perms), order


def _max_diff(model, va, vb, x):
  return float(jnp.abs(model.apply(va, x) - model.apply(vb, x)).max())


def test_spec_is_right(vit):
  model, spec, x, va, _ = vit
  zipjax.check_spec(va, spec, x)
  assert spec.stop_points == ()
  assert {s.name: s.heads for s in spec.spaces if s.heads} == {
      f"block{i}_{k}": f"block{i}" for i in range(DEPTH) for k in ("qk", "vo")}


@pytest.mark.parametrize("matcher", [match.greedy(), match.permute(), match.greedy(beta=0.0)],
                         ids=lambda m: m.__name__)
def test_self_merge_is_exact(vit, matcher):
  model, spec, x, va, _ = vit
  merged = zipjax.zip(va, va, spec, data=[x], matcher=matcher)
  assert _max_diff(model, merged, va, x) < 1e-5


@pytest.mark.parametrize("pair_heads", ["attention", "features"])
@pytest.mark.parametrize("matcher", [match.greedy(), match.permute()], ids=lambda m: m.__name__)
def test_permuted_heads_are_recovered(vit, pair_heads, matcher):
  model, spec, x, va, _ = vit
  vp, _ = _heads_permuted(spec, va)
  assert _max_diff(model, vp, va, x) < 1e-5  # the same function
  merged = zipjax.zip(va, vp, spec, data=[x], matcher=matcher, pair_heads=pair_heads)
  assert _max_diff(model, merged, va, x) < 1e-5


@pytest.mark.parametrize("pair_heads", ["attention", "features"])
def test_pairing_is_the_inverse_of_the_head_permutation(vit, pair_heads):
  model, spec, x, va, _ = vit
  vp, order = _heads_permuted(spec, va)
  stats = zipjax.compute_stats([va, vp], spec, [x], pair_heads=pair_heads)
  for i in range(DEPTH):
    if pair_heads == "attention":
      sim = np.asarray(zipjax.correlation(stats[f"block{i}_qk"].heads))
      pairing = match.pair_groups(match.greedy(), num_models=2, groups=HEADS, similarity=sim)
    else:
      corrs = [np.asarray(zipjax.correlation(stats[f"block{i}_{k}"])) for k in ("qk", "vo")]
      pairing = match.pair_groups(match.greedy(), corrs, num_models=2, groups=HEADS)
    # The copy's head h is the original's head order[h]: both make merged head order[h].
    np.testing.assert_array_equal(pairing[0], np.arange(HEADS))
    np.testing.assert_array_equal(pairing[1], order[i])


def test_without_head_pairing_the_permuted_copy_is_not_recovered(vit):
  """The same spec with heads matched in place (plain groups): the test above could fail."""
  model, spec, x, va, _ = vit
  vp, _ = _heads_permuted(spec, va)
  spaces = tuple(S.Space(s.name, s.width, groups=s.groups) for s in spec.spaces)
  in_place = S.Spec(spaces=spaces, leaves=spec.leaves, stop_points=(), apply=spec.apply,
                    features=spec.features, batchnorm_stats=spec.batchnorm_stats)
  merged = zipjax.zip(va, vp, in_place, data=[x])
  assert _max_diff(model, merged, va, x) > 1e-2


def test_real_merge_keeps_heads_whole(vit):
  model, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x])
  merges = zipjax.compute_merges(stats, num_models=2, spec=spec)
  size = WIDTH // HEADS
  for i in range(DEPTH):
    into = {k: np.asarray(merges[f"block{i}_{k}"].groups).reshape(2, HEADS, size) // size
            for k in ("qk", "vo")}
    for k in into.values():
      assert (k == k[..., :1]).all()  # every model head feeds one merged head
    np.testing.assert_array_equal(into["qk"], into["vo"])  # the same pairing for both
  merged = zipjax.apply_merges([va, vb], spec, merges)
  assert jax.tree.structure(merged) == jax.tree.structure(va)
  assert np.isfinite(np.asarray(model.apply(merged, x))).all()


def test_merges_that_split_heads_are_refused(vit):
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x])
  merges = zipjax.compute_merges(stats, num_models=2, spec=spec)
  size = WIDTH // HEADS
  ids = np.tile(np.arange(WIDTH), (2, 1))
  ids[1, [0, size]] = ids[1, [size, 0]]  # model 1's head 0 feeds merged heads 0 and 1
  merges["block0_qk"] = match.GroupMerge(ids)
  with pytest.raises(zipjax.MismatchError, match="attention heads"):
    zipjax.apply_merges([va, vb], spec, merges)


def test_nnx_vit_merges_like_linen(vit):
  model, spec, x, va, vb = vit
  na, nspec = models.nnx_vit(WIDTH, DEPTH, HEADS, MLP, patch=8, image_size=16,
                             rngs=nnx.Rngs(0))
  nb, _ = models.nnx_vit(WIDTH, DEPTH, HEADS, MLP, patch=8, image_size=16, rngs=nnx.Rngs(1))
  for module, variables in ((na, va), (nb, vb)):
    nnx.update(module, nnx.State(variables["params"]))
  np.testing.assert_allclose(na(x), model.apply(va, x), rtol=1e-5, atol=1e-5)
  zipjax.check_spec(nnx.state(na, nnx.Param), nspec, x)
  merged = zipjax.zip(na, nb, nspec, data=[x])
  linen = zipjax.zip(va, vb, spec, data=[x])
  np.testing.assert_allclose(merged(x), model.apply(linen, x), rtol=1e-4, atol=1e-5)


def test_group_similarity_matches_brute_force():
  rng = np.random.default_rng(0)
  n, groups, size = 6, 3, 2
  feats = rng.standard_normal((200, 2 * n))
  corr = np.corrcoef(feats, rowvar=False)
  sim = match.group_similarity(corr, num_models=2, groups=groups)
  for i, j in itertools.product(range(2 * groups), repeat=2):
    block = corr[i * size:(i + 1) * size, j * size:(j + 1) * size]
    best = max(np.mean([block[a, p[a]] for a in range(size)])
               for p in itertools.permutations(range(size)))
    assert sim[i, j] == pytest.approx(1.0 if i == j else best)


def test_pair_groups_merges_heads_of_one_model_within_budget():
  """Model 0's heads 0 and 1 are copies of each other: greedy merges them when its
  same-model budget allows, permute never does."""
  rng = np.random.default_rng(1)
  size, groups = 4, 4
  heads = rng.standard_normal((500, 2 * groups, size))
  heads[:, 1] = heads[:, 0]
  corr = np.corrcoef(heads.reshape(500, -1), rowvar=False)
  pairing = match.pair_groups(match.greedy(beta=1.0), [corr], num_models=2, groups=groups)
  assert pairing[0, 0] == pairing[0, 1]
  assert (np.bincount(pairing.ravel(), minlength=groups) >= 1).all()
  pairing = match.pair_groups(match.permute(), [corr], num_models=2, groups=groups)
  assert sorted(pairing[0].tolist()) == sorted(pairing[1].tolist()) == list(range(groups))
  merge = match.match_in_groups(match.greedy(beta=1.0), corr, num_models=2, groups=groups,
                                pairing=match.pair_groups(match.greedy(beta=1.0), [corr],
                                                          num_models=2, groups=groups))
  ids = np.asarray(merge.groups).reshape(2, groups, size)
  assert (ids // size == (ids // size)[..., :1]).all()


def test_pairing_is_checked():
  corr = np.eye(8)
  with pytest.raises(ValueError, match="shape"):
    match.match_in_groups(match.greedy(), corr, num_models=2, groups=2,
                          pairing=np.zeros((2, 3), int))
  with pytest.raises(ValueError, match="every merged group"):
    match.match_in_groups(match.greedy(), corr, num_models=2, groups=2,
                          pairing=np.zeros((2, 2), int))


def test_spaces_of_one_layer_need_the_same_heads():
  with pytest.raises(zipjax.SpecError, match="one group per head"):
    S.Spec(spaces=(S.Space("qk", 8, groups=4, heads="b0"), S.Space("vo", 8, groups=2,
                                                                      heads="b0")),
           leaves={}, stop_points=(), apply=None, features=None, batchnorm_stats=None)
  with pytest.raises(zipjax.SpecError, match="non-empty str"):
    S.Space("qk", 8, groups=4, heads="")


def test_bad_vit_arguments():
  with pytest.raises(ValueError, match="multiple of num_heads"):
    models.vit(width=30, num_heads=4)
  with pytest.raises(ValueError, match="pool"):
    models.vit(pool="max")


def test_inferred_spec_agrees_with_the_declared_one(vit):
  model, spec, x, va, _ = vit
  inferred = zipjax.infer_spec(model, va, x)
  zipjax.check_spec(va, inferred, x)
  mapping = {}  # declared space -> inferred space, the same for every leaf axis
  for path, axes in spec.leaves.items():
    n = np.ndim(_leaf(va, path))
    norm = lambda d: {(a % n, ax.role): ax.space for a, ax in d.items()}  # noqa: E731
    want, have = norm(axes), norm(inferred.leaves[path])
    assert set(want) == set(have), path
    for k in want:
      assert mapping.setdefault(want[k], have[k]) == have[k], (path, k)
  assert len(set(mapping.values())) == len(mapping) == len(spec.spaces)
  for name, other in mapping.items():
    a, b = spec.space(name), inferred.space(other)
    assert (a.width, a.groups) == (b.width, b.groups), name
  layers = lambda s, rename: sorted(  # noqa: E731
      sorted(rename(x.name) for x in s.spaces if x.heads == h)
      for h in {x.heads for x in s.spaces if x.heads})
  assert layers(spec, mapping.get) == layers(inferred, lambda n: n)


def _leaf(variables, path):
  node = variables
  for key in path:
    node = node[key]
  return node


def test_inferred_spec_recovers_permuted_heads(vit):
  model, spec, x, va, _ = vit
  inferred = zipjax.infer_spec(model, va, x)
  vp = zipjax.permute_spaces(va, inferred, jax.random.key(5))
  merged = zipjax.zip(va, vp, inferred, data=[x])
  assert _max_diff(model, merged, va, x) < 1e-5


def test_single_head_attention_is_inferred_with_queries_and_keys_as_one_space():
  def attention(p, x):
    h = x @ p["e"]
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
    w = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 2.0, axis=-1)
    h = h + jnp.einsum("bts,bsd->btd", w, v) @ p["o"]
    return jax.nn.relu(h @ p["w1"]) @ p["w2"]

  rng = np.random.default_rng(0)
  shapes = {"e": (6, 8), "q": (8, 4), "k": (8, 4), "v": (8, 5), "o": (5, 8), "w1": (8, 7),
            "w2": (7, 3)}
  p = {k: jnp.asarray(rng.standard_normal(s) * 0.4, jnp.float32) for k, s in shapes.items()}
  x = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
  spec = zipjax.infer_spec(attention, p, x)
  qk = spec.leaves[("q",)][1].space
  assert spec.leaves[("k",)][1].space == qk
  assert (spec.space(qk).groups, spec.space(qk).heads) == (1, None)
  assert len(spec.space_names) == 4  # stream, queries and keys, values, MLP
  zipjax.check_spec(p, spec, x)
  pp = zipjax.permute_spaces(p, spec, jax.random.key(1))
  merged = zipjax.zip(p, pp, spec, data=[x])
  np.testing.assert_allclose(attention(merged, x), attention(p, x), rtol=1e-5, atol=1e-5)


def test_nnx_vit_zips_without_a_spec(vit):
  _, _, x, _, _ = vit
  na, _ = models.nnx_vit(WIDTH, DEPTH, HEADS, MLP, patch=8, image_size=16, rngs=nnx.Rngs(0))
  merged = zipjax.zip(na, na, data=[x])  # the spec inferred: heads merged
  np.testing.assert_allclose(merged(x), na(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair_heads,on", [("features", ("qk", "vo")),
                                            ("attention", ("maps",))])
def test_experiment_pairings_match_the_library(vit, pair_heads, on):
  """experiments.attention_heads' pairings with greedy are compute_merges': on Q/K and V/O
  features, and on the attention maps."""
  from experiments import attention_heads  # pylint: disable=import-outside-toplevel
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x], pair_heads=pair_heads)
  want = zipjax.compute_merges(stats, num_models=2, spec=spec)
  got = attention_heads.pairing_merges(on=on)(stats, spec, [va, vb], [x])
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name].groups, want[name].groups)


def _maps_reference(spec, variables_list, x, name):
  """numpy: (samples, N * G) attention weights (softmax(q k / sqrt(d)) over the keys) of the
  heads of space ``name``'s queries and keys, model by model."""
  out = []
  groups = spec.space(name).groups
  for v in variables_list:
    q, k = (np.asarray(a, np.float64) for a in spec.features(v, x)[name])
    b, t, w = q.shape
    q, k = q.reshape(b, t, groups, -1), k.reshape(b, t, groups, -1)
    logits = np.einsum("bqhd,bkhd->bqkh", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(2, keepdims=True))
    out.append((weights / weights.sum(2, keepdims=True)).reshape(-1, groups))
  return np.concatenate(out, -1)


def test_head_statistics_are_the_attention_maps_moments(vit):
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x[:3], x[3:]])
  for s in spec.spaces:
    if s.heads is None or not s.name.endswith("qk"):
      assert stats[s.name].heads is None, s.name
      continue
    ref = _maps_reference(spec, [va, vb], x, s.name)
    head = stats[s.name].heads
    assert int(head.count) == ref.shape[0]
    np.testing.assert_allclose(head.mean, ref.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.covariance, np.cov(ref, rowvar=False), rtol=1e-4,
                               atol=1e-5)


def test_pair_heads_features_gathers_no_maps(vit):
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x], pair_heads="features")
  assert all(s.heads is None for s in stats.values())


def test_pair_heads_unknown_is_refused(vit):
  _, spec, x, va, vb = vit
  with pytest.raises(ValueError, match="pair_heads must be one of"):
    zipjax.zip(va, vb, spec, data=[x], pair_heads="maps")
  with pytest.raises(ValueError, match="pair_heads must be one of"):
    zipjax.compute_stats([va, vb], spec, [x], pair_heads="logits")


def test_heads_paired_on_features_where_maps_cannot_be_taken_says_so(vit):
  """A query/key space captured once (here: its last capture only, the keys) gives no
  maps: the layer's heads are paired on their features, with a warning naming it."""
  _, spec, x, va, vb = vit
  keys_only = zipjax.spec.last_captures(spec)
  with pytest.warns(UserWarning, match="paired on the similarity of their features instead "
                    "of their attention maps: attention layer 'block0': none of its spaces "
                    r"\['block0_qk', 'block0_vo'\] is captured exactly twice; attention layer "
                    "'block1'"):
    stats = zipjax.compute_stats([va, vb], keys_only, [x])
  assert all(s.heads is None for s in stats.values())



def test_attention_variants_of_a_spec(vit):
  from experiments import evaluate  # pylint: disable=import-outside-toplevel
  _, spec, _, _, _ = vit
  in_place = evaluate.attention_spec(spec, "in_place")
  assert in_place is evaluate.attention_spec(spec, "in_place")  # cached: compiled once
  assert [s.groups for s in in_place.spaces] == [s.groups for s in spec.spaces]
  assert all(s.heads is None for s in in_place.spaces)
  unmerged = evaluate.attention_spec(spec, "unmerged")
  heads = {s.name for s in spec.spaces if s.heads}
  assert not heads & set(unmerged.space_names)
  assert all(ax.space not in heads for axes in unmerged.leaves.values() for ax in axes.values())
  assert ("params", "block0", "query", "kernel") in unmerged.unmerged
  assert evaluate.attention_spec(spec, "heads") is spec
  with pytest.raises(ValueError, match="attention must be one of"):
    evaluate.attention_spec(spec, "none")


def test_cross_attention_is_inferred_with_heads():
  """Queries from the stream, keys and values from a second input (its own embedding)."""
  def cross(p, inputs):
    x, c = inputs
    h, cc = x @ p["e"], c @ p["ec"]
    split = lambda a: a.reshape(a.shape[0], a.shape[1], 2, 4)  # noqa: E731
    q, k, v = split(h @ p["q"]), split(cc @ p["k"]), split(cc @ p["v"])
    w = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", w, v).reshape(h.shape)
    return jax.nn.relu(h + o @ p["o"]) @ p["w2"]

  rng = np.random.default_rng(2)
  shapes = {"e": (6, 8), "ec": (5, 8), "q": (8, 8), "k": (8, 8), "v": (8, 8), "o": (8, 8),
            "w2": (8, 3)}
  p = {k: jnp.asarray(rng.standard_normal(s) * 0.4, jnp.float32) for k, s in shapes.items()}
  inputs = (jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32),
            jnp.asarray(rng.standard_normal((3, 7, 5)), jnp.float32))
  spec = zipjax.infer_spec(cross, p, inputs)
  qk, vo = spec.leaves[("q",)][1].space, spec.leaves[("v",)][1].space
  assert spec.leaves[("k",)][1].space == qk
  assert spec.space(qk).groups == spec.space(vo).groups == 2
  assert spec.space(qk).heads == spec.space(vo).heads is not None
  zipjax.check_spec(p, spec, inputs)
  pp = zipjax.permute_spaces(p, spec, jax.random.key(4))
  stats = zipjax.compute_stats([p, pp], spec, [{"inputs": inputs}])
  assert int(stats[qk].heads.count) == 3 * 5 * 7  # (query, key) pairs of differing lengths
  merged = zipjax.zip(p, pp, spec, data=[{"inputs": inputs}])
  np.testing.assert_allclose(cross(merged, inputs), cross(p, inputs), rtol=1e-5, atol=1e-5)


def test_experiment_pairing_on_attention_maps_recovers_permuted_heads(vit):
  from experiments import attention_heads  # pylint: disable=import-outside-toplevel
  model, spec, x, va, _ = vit
  vp, _ = _heads_permuted(spec, va)
  stats = zipjax.compute_stats([va, vp], spec, [x])
  for heads in (match.permute(), match.greedy()):
    merges = attention_heads.pairing_merges(on=("maps",), heads=heads)(stats, spec, [va, vp],
                                                                       [x])
    merged = zipjax.apply_merges([va, vp], spec, merges)
    assert _max_diff(model, merged, va, x) < 1e-5


def test_sweeps_of_matchers_refuse_heads(vit):
  """experiments' matcher sweeps match spaces whole: a ViT is refused, not merged wrong."""
  from experiments import evaluate  # pylint: disable=import-outside-toplevel
  _, spec, x, va, vb = vit
  with pytest.raises(ValueError, match="matched in groups"):
    evaluate.evaluate_matchers(spec, [va, vb], tasks=[[0], [1]], calibration=[x], test=[],
                               variants=[])


def test_pair_groups_takes_correlations_or_a_similarity_not_both():
  order = np.array([2, 0, 3, 1])  # model B's head h is model A's head order[h]
  cross = np.zeros((HEADS, HEADS))
  cross[order, np.arange(HEADS)] = 0.9
  sim = np.block([[np.eye(HEADS), cross], [cross.T, np.eye(HEADS)]])
  pairing = match.pair_groups(match.greedy(), num_models=2, groups=HEADS, similarity=sim)
  np.testing.assert_array_equal(pairing, [np.arange(HEADS), order])
  with pytest.raises(ValueError, match="not both"):
    match.pair_groups(match.greedy(), [sim], num_models=2, groups=HEADS, similarity=sim)
  with pytest.raises(ValueError, match="not neither"):
    match.pair_groups(match.greedy(), num_models=2, groups=HEADS)
  with pytest.raises(ValueError, match=r"must have shape \(8, 8\)"):
    match.pair_groups(match.greedy(), num_models=2, groups=HEADS, similarity=np.eye(6))


def test_auto_microbatch_counts_the_attention_maps(vit):
  """The CPU step size bounds the attention maps a step holds as well as the features."""
  _, spec, x, va, vb = vit
  sig, example = stats_lib._abstract(va), stats_lib._example(x)
  plain = stats_lib._feature_bytes(spec, sig, example, 2)
  qk = tuple(f"block{i}_qk" for i in range(DEPTH))
  tokens = (16 // 8) ** 2 + 1  # patches and the class token
  assert stats_lib._feature_bytes(spec, sig, example, 2, qk) == (
      plain + 4 * 2 * DEPTH * HEADS * tokens * tokens)


def test_by_space_matches_each_space_with_its_matcher(vit):
  """by_space: the named spaces with their matchers, the others with the default, heads
  paired with the matcher of the layer's first space; the same merges as matching each
  space's statistics alone with its matcher."""
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x])
  matcher = match.by_space({"stream": match.permute(), "block1_mlp": match.identity()})
  got = zipjax.compute_merges(stats, num_models=2, spec=spec, matcher=matcher)
  greedy = zipjax.compute_merges(stats, num_models=2, spec=spec)
  for name, want in [("stream", match.permute()), ("block1_mlp", match.identity())]:
    ref = want(np.asarray(zipjax.correlation(stats[name])), num_models=2)
    np.testing.assert_array_equal(got[name].groups, ref.groups)
  for name in set(stats) - {"stream", "block1_mlp"}:
    np.testing.assert_array_equal(got[name].groups, greedy[name].groups)


def test_by_space_in_the_experiment_is_the_library(vit):
  """The experiment's "residual stream by permute" with heads paired on attention maps is
  zip(..., matcher=by_space({"stream": permute()}))'s merges."""
  from experiments import attention_heads  # pylint: disable=import-outside-toplevel
  _, spec, x, va, vb = vit
  stats = zipjax.compute_stats([va, vb], spec, [x])
  want = attention_heads.pairing_merges(on=("maps",), matchers={"stream": match.permute()})(
      stats, spec, [va, vb], [x])
  got = zipjax.compute_merges(stats, num_models=2, spec=spec,
                              matcher=match.by_space({"stream": match.permute()}))
  for name in want:
    np.testing.assert_array_equal(got[name].groups, want[name].groups)


def test_by_space_refuses_what_it_cannot_use(vit):
  model, spec, x, va, vb = vit
  with pytest.raises(ValueError, match=r"by_space names spaces \['steam'\].*'stream'"):
    zipjax.zip(va, vb, spec, data=[x], matcher=match.by_space({"steam": match.permute()}))
  with pytest.raises(TypeError, match="call it to get one"):
    match.by_space({"stream": match.permute})
  with pytest.raises(TypeError, match="per-space matchers"):
    match.by_space({"stream": match.weight_matching()})
  assert match.by_space({"stream": match.permute()}).__name__ == (
      "by_space({'stream': permute()}, default=greedy(alpha=0.5, beta=0.5))")
  merged = zipjax.zip(va, va, spec, data=[x], matcher=match.by_space(
      {"stream": match.permute()}))  # a self-merge stays exact
  assert _max_diff(model, merged, va, x) < 1e-5
