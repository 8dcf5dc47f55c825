"""A second synthetic VQA task ("synth_scenes") on which token-selection methods separate.

Design (fixed and committed before any method was run on it; `synth_vqa` stays as it is). On `synth_vqa` a scene
holds 3-5 objects, so from about 1/9 of the patches a method can keep every object and learned controllers equal
`full`. Here a scene holds more objects than 1/9 of the patches can keep, a question is about a few of them, so
which tokens matter depends on the question, and one question type is about the scene as a whole.

* **Geometry.** As `synth_vqa`: 96x96 RGB images, 8 px patches, a 12x12 grid of 144 patches, patch index
  ``row * 12 + col`` (row 0 at the top). 1/9 of the patches is 16.
* **Background.** One of four muted tints, named ``gray``, ``brown``, ``pink`` and ``olive`` (a per-image
  brightness jitter, a soft linear gradient and per-pixel noise; no clutter).
* **Objects ("tiles").** 18-24 per scene, each filling one whole patch cell of its own (cells drawn at random): the
  cell is painted near-black and holds a ``circle``, ``square``, ``triangle`` or ``cross`` of 6 px in one of the
  six saturated colours of `synth_vqa` (``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``cyan``). A tile's
  patch therefore shows no background, and 18-24 tiles are more than the 16 patches of a 1/9 budget: no selection
  at that budget keeps every object.
* **Question types** (``qtype``; one phrasing each; sample ``i`` has type ``QTYPES[i % 5]``; answers balanced within
  each type by cycling):

  =========== =============================================================== ==================================
  qtype       question                                                        answer / scene constraint
  =========== =============================================================== ==================================
  count       "How many {color} objects are there?"                           "1" ... "6": exactly that many
                                                                              tiles of the colour
  shape       "What shape is the {color} object?"                             a shape word; the colour is unique
  left_right  "Is the {color1} {shape1} left or right of the {color2}         "left"/"right": both (colour,
              {shape2}?"                                                      shape) pairs unique, their columns
                                                                              at least 2 apart (16 px)
  above_below "Is the {color1} {shape1} above or below the {color2}           "above"/"below": both pairs unique,
              {shape2}?"                                                      rows at least 2 apart
  background  "What color is the background?"                                 ``gray``/``brown``/``pink``/``olive``
  =========== =============================================================== ==================================

  Answer vocabulary (18 words): ``1``-``6``, the 4 shapes, ``left right above below``, the 4 background names.
* **relevant_patches** (the oracle for selection quality, as in `synth_vqa`): the tiles the question is about (the
  counted colour's tiles; the named object; the two named objects), and for ``background`` every patch without a
  tile (120-126 patches, any of which shows the background). A question names at most 6 of its 18-24 tiles.
* **Determinism and splits.** Sample ``i`` of a split comes from ``numpy.random.default_rng([seed, i])`` alone.
  Seeds: train ``SPLIT_SEEDS["train"]`` = 11, val 12, test 13 (none shared with `synth_vqa`); the test split has
  1,000 questions, 200 per type.

What the design expects (to be measured, not assumed; the smoke model's card reports it): at 16 patches a uniform
random selection keeps each tile with probability 1/9, so count, shape and the relations fall towards guessing while
the background question stays easy; a selection that keeps only salient tiles keeps most objects but no background
patch, and must guess the background (unless the vision encoder has already mixed the background into the tiles'
features, which features-site pruning cannot prevent); keeping the question's relevant patches answers every type.
Calibration targets (issue 16): ``full`` >= 85 %; ``random`` at 16 patches at least 30 points below ``full``; the
oracle selection at 16 within 5 points of ``full``; the best registered method at 16 at least 10 points below
``full``. A target that is missed is reported as missed, with the reason; the task is not tuned to a method.
"""

from __future__ import annotations
