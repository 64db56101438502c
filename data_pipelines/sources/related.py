"""A pair source whose neighbours file may name images of another collection (X_I).

UNIMO retrieves the related images X_I of a pair from the UNPAIRED image collections. A pair
source spec with ``related_images: {source spec}`` opens that collection too: `find(key)` looks a
neighbour's key up in the pair source first, then in the collection, and `read` of an index past
the pair records reads the collection record ``index - len(pairs)``. ``len`` is the pair
source's, so the mixture draws pairs only; the collection is read only for neighbours.
"""
from data_pipelines.sources import base


class RelatedImages(base.Source):
  """`pairs` records; indices >= len(pairs) are records of the `collection` (neighbours only)."""

  def __init__(self, pairs: base.Source, collection: base.Source):
    super().__init__(pairs.name)
    self._pairs, self._collection = pairs, collection
    self.fields = pairs.fields
    self.index_drops = pairs.index_drops
    same = pairs.region_dtype == collection.region_dtype
    self.region_dtype = pairs.region_dtype if same else None

  def __len__(self):
    return len(self._pairs)

  def key(self, i):
    return self._pairs.key(i) if i < len(self._pairs) else self._collection.key(
        i - len(self._pairs))

  def restrict(self, fields):
    self._pairs.restrict(fields)
    # A related image only needs what an image slot reads (the pair's text fields are absent).
    self._collection.restrict(set(fields) & set(self._collection.fields))

  def find(self, key):
    i = self._pairs.find(key)
    if i is not None:
      return i
    j = self._collection.find(key)
    return None if j is None else len(self._pairs) + j

  def read(self, i):
    n = len(self._pairs)
    return self._pairs.read(i) if i < n else self._collection.read(i - n)

  def close(self):
    self._pairs.close()
    self._collection.close()
