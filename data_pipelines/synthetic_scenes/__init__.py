"""synthetic_scenes: the embedded default dataset (procedural scenes of coloured shapes).

Light modules (numpy only): ``scene`` (world, sampling, scene graph), ``render`` (pixels and
boxes), ``captions`` (templates, parsing, truth, exact rewrites), ``regions`` (region features
and labels), ``text`` (QA pairs, corpus), ``generate`` (records by index, no TensorFlow).
``SyntheticScenes`` / ``ScenesConfig`` (TFDS) are imported on first use, so importing this
package alone does not import TensorFlow; importing them registers "synthetic_scenes" with TFDS.
"""
from data_pipelines.synthetic_scenes.generate import SceneOptions, example, generate_examples
from data_pipelines.synthetic_scenes.render import render as render_scene
from data_pipelines.synthetic_scenes.scene import Scene, SceneObject, sample_scene

__all__ = ["SceneOptions", "example", "generate_examples", "render_scene", "Scene", "SceneObject",
           "sample_scene", "SyntheticScenes", "ScenesConfig", "builder_for"]


def __getattr__(name):
  if name in ("SyntheticScenes", "ScenesConfig"):
    from data_pipelines.synthetic_scenes import builder  # pylint: disable=import-outside-toplevel
    return getattr(builder, name)
  raise AttributeError(name)


def builder_for(options: SceneOptions, data_dir: str):
  """The TFDS builder of ``options`` under ``data_dir`` (not yet prepared)."""
  from data_pipelines.synthetic_scenes import builder  # pylint: disable=import-outside-toplevel
  known = {c.name: c for c in builder.SyntheticScenes.BUILDER_CONFIGS}
  config = known.get(options.name)
  if config is None or config.options != options:
    config = builder.ScenesConfig(options=options)
  return builder.SyntheticScenes(config=config, data_dir=data_dir)
