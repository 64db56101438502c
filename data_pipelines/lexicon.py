"""Word classes for rewriting real captions into hard negatives.

Each class is a tuple of groups; the words of a group mean (nearly) the same thing and are
never swapped for each other, so any replacement from another group changes the meaning:
"a red car" -> "a blue car", "two dogs" -> "five dogs", "a cat under the table" -> "a cat on
top of the table". Objects carry (singular, plural) forms so a replacement keeps the number
of its noun. Entries are lower case; phrases (several words) are allowed in any class.
"""

COLOURS = (
    ("red",), ("orange",), ("yellow",), ("green",), ("blue",), ("purple", "violet"),
    ("pink",), ("brown",), ("black",), ("white",), ("gray", "grey"), ("silver",), ("gold",),
)

SIZES = (("small", "little", "tiny"), ("large", "big", "huge", "giant"))

# Counts >= 2 only, so the noun that follows stays plural.
NUMBERS = (
    ("two",), ("three",), ("four",), ("five",), ("six",), ("seven",), ("eight",), ("nine",),
    ("ten",), ("several", "many"),
)

SHAPES = (("circle",), ("square",), ("triangle",), ("diamond",), ("cross",), ("star",),
          ("rectangle",), ("hexagon",))

# (singular, plural) per group, by category; common objects of captioning data sets (COCO,
# Flickr30k). A rewrite replaces an object by another of its category ("dog" -> "cat", never
# "dog" -> "pizza"), which keeps the negative plausible and therefore hard.
OBJECT_CATEGORIES = {
    "people": ((("man", "men"), ("guy", "guys")), (("woman", "women"), ("lady", "ladies")),
               (("boy", "boys"),), (("girl", "girls"),),
               (("child", "children"), ("kid", "kids"))),
    "animals": ((("dog", "dogs"), ("puppy", "puppies")), (("cat", "cats"), ("kitten", "kittens")),
                (("horse", "horses"),), (("cow", "cows"),), (("bird", "birds"),),
                (("elephant", "elephants"),), (("giraffe", "giraffes"),),
                (("zebra", "zebras"),), (("bear", "bears"),)),
    "vehicles": ((("car", "cars"),), (("bus", "buses"),), (("truck", "trucks"),),
                 (("train", "trains"),), (("bicycle", "bicycles"), ("bike", "bikes")),
                 (("motorcycle", "motorcycles"),), (("boat", "boats"),),
                 (("airplane", "airplanes"), ("plane", "planes"))),
    "furniture": ((("table", "tables"),), (("chair", "chairs"),), (("bed", "beds"),),
                  (("couch", "couches"), ("sofa", "sofas")), (("bench", "benches"),)),
    "food": ((("pizza", "pizzas"),), (("sandwich", "sandwiches"),), (("cake", "cakes"),),
             (("banana", "bananas"),), (("apple", "apples"),), (("donut", "donuts"),)),
    "things": ((("umbrella", "umbrellas"),), (("kite", "kites"),),
               (("surfboard", "surfboards"),), (("skateboard", "skateboards"),),
               (("ball", "balls"),), (("laptop", "laptops"),), (("phone", "phones"),),
               (("clock", "clocks"),), (("book", "books"),), (("bottle", "bottles"),),
               (("cup", "cups"),), (("bowl", "bowls"),), (("plate", "plates"),)),
}
OBJECTS = tuple(g for groups in OBJECT_CATEGORIES.values() for g in groups)
OBJECT_CATEGORY = tuple(c for c, groups in OBJECT_CATEGORIES.items() for _ in groups)

# Spatial relations, in two classes by grammar so a replacement fits the sentence:
# prepositions ("a cat under the table" -> "a cat behind the table") and directions ("to the
# left of", "at the top"). The first word of a group is what a replacement writes.
RELATIONS = (
    ("above", "over", "on top of"), ("below", "under", "beneath", "underneath"),
    ("in front of",), ("behind",), ("inside",), ("outside",),
    ("near", "next to", "beside"), ("far from", "away from"),
)
DIRECTIONS = (("left",), ("right",), ("top",), ("bottom",))

# class name -> groups of surface forms (for OBJECTS, the singular forms; see PLURALS).
CLASSES = {
    "colour": COLOURS,
    "size": SIZES,
    "number": NUMBERS,
    "shape": SHAPES,
    "object": tuple(tuple(s for s, _ in g) for g in OBJECTS),
    "relation": RELATIONS,
    "direction": DIRECTIONS,
}
# Words whose replacement must be plural: plural form -> singular form.
PLURALS = {p: s for g in OBJECTS for s, p in g}
PLURALS.update({s + "s": s for g in SHAPES for s in g})
SINGULAR_TO_PLURAL = {s: p for p, s in PLURALS.items()}
