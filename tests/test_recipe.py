"""Recipe files: every named recipe round-trips, and every malformed file is a RecipeError
that says what was found and what is expected."""

import json

import pytest

from fxcompress.errors import RecipeError
from fxcompress.methods import GPTQ, SparseGPT
from fxcompress.recipe import EXAMPLE, NAMED, Recipe

SHAPE = "A recipe file looks like this:"  # shape errors end with the example

MALFORMED = [
    # (YAML text, fragments the message must contain)
    ("", ["got nothing (an empty file?)", SHAPE]),
    ("gptq-w4g64\n", ["must be a mapping with a 'rules' list", "the string 'gptq-w4g64'", SHAPE]),
    ("- pattern: '.*'\n  method: GPTQ\n", ["must be a mapping", "got a list of 1", SHAPE]),
    ("42\n", ["got int 42", SHAPE]),
    ("version: 1\n", ["got ['version']", SHAPE]),
    ("rule:\n  - {pattern: a, method: null}\n", ["'rules' (and optionally 'version')",
                                                  "got ['rule']", SHAPE]),
    ("rules:\n  '.*': {method: GPTQ, bits: 4}\n",
     ["'rules' must be a list", "got a mapping with keys ['.*']", SHAPE]),
    ("rules:\n", ["'rules' must be a list", "got null", SHAPE]),
    ("rules: GPTQ\n", ["'rules' must be a list", "the string 'GPTQ'", SHAPE]),
    ("rules:\n  - GPTQ\n", ["rules[0] must be a mapping with 'pattern' and 'method'",
                           "the string 'GPTQ'", SHAPE]),
    ("rules:\n  - [a, GPTQ]\n", ["rules[0] must be a mapping", "a list of 2", SHAPE]),
    ("rules:\n  - {method: GPTQ}\n", ["rules[0] needs a 'pattern'", "got null", SHAPE]),
    ("rules:\n  - {pattern: 3, method: null}\n", ["rules[0] needs a 'pattern'", "int 3"]),
    ("rules:\n  - {pattern: '.*', bits: 4}\n", ["rules[0] ('.*') has no 'method'",
                                               "null to leave the layers dense", SHAPE]),
    ("rules:\n  - {pattern: a, method: GTPQ}\n", ["rules[0] ('a'): unknown method 'GTPQ'",
                                                  "'GPTQ'"]),
    ("rules:\n  - {pattern: a, method: [GPTQ]}\n", ["unknown method ['GPTQ']"]),
    ("rules:\n  - {pattern: a, method: {name: GPTQ}}\n", ["unknown method {'name': 'GPTQ'}"]),
    ("rules:\n  - {pattern: a, method: null, bits: 4}\n",
     ["method null (dense) takes no fields, got ['bits']"]),
    ("rules:\n  - {pattern: a, method: GPTQ, bitz: 4}\n", ["GPTQ has no field(s) ['bitz']"]),
    ("rules:\n  - {pattern: a, method: GPTQ, bits: '4'}\n",
     ["GPTQ.bits must be an integer, got the string '4'"]),
    ("rules:\n  - {pattern: a, method: GPTQ, bits: 4.0}\n", ["GPTQ.bits must be an integer"]),
    ("rules:\n  - {pattern: a, method: GPTQ, bits: true}\n", ["GPTQ.bits must be an integer"]),
    ("rules:\n  - {pattern: a, method: GPTQ, sym: 1}\n", ["GPTQ.sym must be true or false"]),
    ("rules:\n  - {pattern: a, method: GPTQ, damp: null}\n", ["GPTQ.damp must be a number, "
                                                             "got null"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, sparsity: 50%}\n",
     ["SparseGPT.sparsity must be a number, got the string '50%'"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, n_m: 2}\n",
     ["SparseGPT.n_m must be a pair of integers like [2, 4] or null, got int 2"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, n_m: '2:4'}\n", ["SparseGPT.n_m must be"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, n_m: [2, 4, 8]}\n", ["SparseGPT.n_m must be"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, quant: GPTQ}\n",
     ["SparseGPT.quant must be a mapping like {method: GPTQ, ...} or null"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, quant: {method: RTN}}\n",
     ["SparseGPT.quant must be a mapping like {method: GPTQ", "with method 'RTN'"]),
    ("rules:\n  - {pattern: a, method: SparseGPT, quant: {method: GPTQ, bitz: 4}}\n",
     ["GPTQ has no field(s) ['bitz']"]),
    ("rules:\n  - {pattern: a, method: Magnitude, quant: {method: GPTQ}}\n",
     ["Magnitude.quant must be a mapping like {method: RTN"]),
    ("rules:\n  - {pattern: '(', method: GPTQ}\n", ["invalid pattern '('"]),
    ("rules:\n  - {pattern: a, method: null}\n  - {pattern: a, method: GPTQ}\n",
     ["rules[1]: pattern 'a' appears twice"]),
    ("version: 2\nrules: []\n", ["recipe version 2 is not supported"]),
    ("rules: [\n", ["not valid YAML"]),
    ("rules:\n  - {pattern: a, method: GPTQ, bits: 5}\n", ["bits must be one of"]),
]


@pytest.mark.parametrize("text, fragments", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_yaml_says_what_was_found_and_what_is_expected(text, fragments):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(text)
    for fragment in fragments:
        assert fragment in str(e.value)
    if SHAPE in fragments:
        assert str(e.value).endswith(EXAMPLE)


@pytest.mark.parametrize("data", [[], "x", None, {"rules": {"a": None}}, {"rules": ["GPTQ"]},
                                  {"rules": [{"pattern": "a", "method": "GPTQ", "bits": "4"}]}])
def test_malformed_json_is_a_recipe_error(data):
    with pytest.raises(RecipeError):
        Recipe.from_json(json.dumps(data))
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.from_json("{rules: ")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  '.*': {method: GPTQ}\n")
    with pytest.raises(RecipeError, match=f"recipe file {path}: 'rules' must be a list"):
        Recipe.load(path)


def test_the_example_in_the_messages_is_a_valid_recipe():
    recipe = Recipe.from_yaml(EXAMPLE)
    assert recipe.rules == ((r"model\.layers\..*", GPTQ(4, 64)), (".*", None))


@pytest.mark.parametrize("name", NAMED)
def test_named_recipes_round_trip(name):
    recipe = NAMED[name]
    assert Recipe.from_yaml(recipe.to_yaml()).rules == recipe.rules
    assert Recipe.from_json(recipe.to_json()).rules == recipe.rules


def test_file_values_keep_their_types():
    recipe = Recipe.from_yaml("rules:\n  - {pattern: a, method: SparseGPT, sparsity: 0,"
                              " n_m: [2, 4], quant: {method: GPTQ, group_size: -1}}\n"
                              "  - {pattern: b, method: GPTQ, dense_output: true}\n"
                              "  - {pattern: c, method: SparseGPT, solver: admm}\n")
    assert recipe.rules[0][1] == SparseGPT(0, n_m=(2, 4), quant=GPTQ(group_size=-1))
    assert recipe.rules[1][1] == GPTQ(dense_output=True)
    assert recipe.rules[2][1] == SparseGPT(solver="admm")
    with pytest.raises(RecipeError, match="SparseGPT.solver must be a string, got a list"):
        Recipe.from_yaml("rules:\n  - {pattern: c, method: SparseGPT, solver: [admm]}\n")
    with pytest.raises(RecipeError, match="solver must be one of"):
        Recipe.from_yaml("rules:\n  - {pattern: c, method: SparseGPT, solver: adam}\n")


def test_no_two_named_recipes_are_the_same_recipe():
    """A name is a promise of a different setting: two equal recipes under two names (as the
    act-order variants became when act-order turned default) would be measured twice."""
    seen: dict[Recipe, str] = {}
    for name, recipe in NAMED.items():
        assert recipe not in seen, f"{name} equals {seen.get(recipe)}"
        seen[recipe] = name
