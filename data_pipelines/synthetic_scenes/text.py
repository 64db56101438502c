"""Language about synthetic scenes: question-answer pairs and the text-only corpus.

QA pairs (for fine-tuning, e.g. VQA-style heads) are computed from the scene graph: counts,
attribute queries about uniquely named objects, existence and relation yes/no questions.

The corpus is what the text stream reads: short documents that mix scene descriptions (caption
templates), facts derived from a scene graph (inverse relations, counts, attributes) and general
facts about shapes and colours. Its scenes are sampled from the standard (seen) combinations only,
so the corpus never mentions a held-out (colour, shape) pair.
"""
import numpy as np

from data_pipelines.synthetic_scenes import captions as captions_lib
from data_pipelines.synthetic_scenes import scene as scene_lib
from data_pipelines.synthetic_scenes.scene import COLOURS, SHAPES, SIZES

NUMBER_WORDS = ("zero", "one", "two", "three", "four")

GENERAL_FACTS = (
    "a triangle has three sides and three corners.",
    "a square has four equal sides and four right angles.",
    "a circle is round and has no corners.",
    "a diamond looks like a square standing on one of its corners.",
    "a cross is made of two bars that meet in the middle.",
    "a star has five points.",
    "a star has more points than a triangle has corners.",
    "red and yellow paint mixed together make orange.",
    "blue and red paint mixed together make purple.",
    "blue and yellow paint mixed together make green.",
    "pink is a light shade of red.",
    "white is the brightest of all colours.",
    "if one shape is to the left of another, the other is to the right of it.",
    "if one shape is above another, the other is below it.",
    "a large shape covers more of the picture than a small one.",
    "each picture shows one, two or three shapes on a patterned background.",
    "no two shapes in a picture share a place.",
    "the background of a picture is dark, so bright shapes stand out.",
    "a shape in the top left corner is above any shape at the bottom.",
    "a shape on the right is to the right of any shape on the left.",
    "the picture is divided into three rows and three columns.",
    "a shape in the center is in the middle row and the middle column.",
    "small shapes leave more room around them than large shapes.",
    "a square and a diamond have the same number of corners.",
    "the colour of a shape does not change its size.",
)


def _the(obj) -> str:
  return f"the {obj.description}"


def qa_pairs(scene: scene_lib.Scene, rng: np.random.Generator, seen_only: bool = True):
  """Question-answer pairs true of the scene, as a list of (question, answer) strings.

  With ``seen_only`` a "no" existence question never names a held-out combination.
  """
  objs = scene.objects
  n = len(objs)
  out = [("how many shapes are there?", NUMBER_WORDS[n])]
  colour = int(rng.integers(len(COLOURS)))
  count = sum(o.colour == colour for o in objs)
  out.append((f"how many {COLOURS[colour]} shapes are there?", NUMBER_WORDS[count]))
  unique_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
  if unique_shape:
    o = unique_shape[int(rng.integers(len(unique_shape)))]
    out.append((f"what colour is the {SHAPES[o.shape]}?", COLOURS[o.colour]))
  unique_colour = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
  if unique_colour:
    o = unique_colour[int(rng.integers(len(unique_colour)))]
    out.append((f"what shape is the {COLOURS[o.colour]} object?", SHAPES[o.shape]))
  unique_pair = [o for o in objs
                 if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1]
  if unique_pair:
    o = unique_pair[int(rng.integers(len(unique_pair)))]
    out.append((f"what size is the {COLOURS[o.colour]} {SHAPES[o.shape]}?", SIZES[o.size]))
  o = objs[int(rng.integers(n))]
  out.append((f"is there a {o.description}?", "yes"))
  present = {p.attributes for p in objs}
  for _ in range(20):  # a description that matches no object
    attrs = (int(rng.integers(len(SIZES))), int(rng.integers(len(COLOURS))),
             int(rng.integers(len(SHAPES))))
    if attrs not in present and (not seen_only or scene_lib.is_seen(attrs[1], attrs[2])):
      out.append((f"is there a {SIZES[attrs[0]]} {COLOURS[attrs[1]]} {SHAPES[attrs[2]]}?", "no"))
      break
  if n > 1:
    i, j = rng.choice(n, size=2, replace=False)
    p = scene_lib.RELATIONS[int(rng.integers(len(scene_lib.RELATIONS)))]
    answer = "yes" if scene.relation_holds(int(i), p, int(j)) else "no"
    phrase = captions_lib.REL_PHRASE[p]
    out.append((f"is {_the(objs[i])} {phrase} {_the(objs[j])}?", answer))
  return out


def corpus_document(rng: np.random.Generator, image_size: int = 64) -> str:
  """One document of the text corpus: 3-6 sentences about a freshly sampled (seen) scene and
  the world of shapes."""
  scene = scene_lib.sample_scene(rng, image_size=image_size)
  _, caps = captions_lib.captions(scene, rng)
  picked = rng.choice(len(caps), size=int(rng.integers(1, 3)), replace=False)
  sentences = [caps[k] for k in sorted(picked)]
  n = len(scene.objects)
  sentences.append(f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} "
                   f"shape{'' if n == 1 else 's'} in the picture.")
  rels = scene.relations()
  if rels:
    i, p, j = rels[int(rng.integers(len(rels)))]
    a, b = scene.objects[i], scene.objects[j]
    sentences.append(f"{_the(a)} is {captions_lib.REL_PHRASE[p]} {_the(b)}, so {_the(b)} is "
                     f"{captions_lib.REL_PHRASE[scene_lib.INVERSE[p]]} {_the(a)}.")
  else:
    o = scene.objects[0]
    sentences.append(f"the {SHAPES[o.shape]} is {COLOURS[o.colour]} and {SIZES[o.size]}.")
  for k in rng.choice(len(GENERAL_FACTS), size=int(rng.integers(1, 3)), replace=False):
    sentences.append(GENERAL_FACTS[k])
  return " ".join(sentences)
