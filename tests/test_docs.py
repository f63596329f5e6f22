"""The docs tell what runs: README's commands are CI's, and every command in the guides is
one the tests run or names the RESULTS.md / BENCHMARKS.md entry that ran it."""

import os
import re
import shlex

from tests.conftest import REPO

GUIDES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCED = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)  # fences pair in order
SHELL = ("", "bash", "sh", "shell", "console")
RESULT_LINK = re.compile(r"\]\((?:docs/)?(?:results|benchmark-results)\.md#[\w-]+\)")


def readme_block(section: str) -> str:
  """The first fenced block of README's `## section`."""
  text = (REPO / "README.md").read_text()
  body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
  return next(b.group(2) for b in FENCED.finditer(body) if b.group(1) in SHELL).strip()


def test_ci_runs_readmes_set_up_and_test_commands():
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  set_up = readme_block("Set up").split(" && ")[-1]  # after `python3.11 -m venv .venv && . .venv/bin/activate`
  assert set_up in ci, (set_up, ci)
  assert readme_block("Test") in ci


def commands(text: str):
  """(command line, the paragraph after its block) for each `python -m experiments.X` line of
  the text's shell blocks."""
  for block in FENCED.finditer(text):
    if block.group(1) not in SHELL:
      continue
    after = text[block.end() :].lstrip("\n").split("\n\n", 1)[0]
    after = "" if after.startswith("```") else after  # the next paragraph, not the next block
    for line in block.group(2).replace("\\\n", " ").splitlines():
      if "python -m experiments." in line:
        yield line.strip(), after


def flags(words):
  """The module and {flag name: value} of `[VAR=value ...] python -m module --flag=value ...`."""
  words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
  assert words[:2] == ["python", "-m"], words
  return words[2], dict(w.split("=", 1) if "=" in w else (w, "") for w in words[3:] if w.startswith("--"))


def run_by_a_test(module: str, wanted: dict, invocations) -> bool:
  """Whether a test ran `module` with the same --config file and every flag the command sets."""
  for ran_module, args in invocations:
    _, ran = flags(["python", "-m", ran_module, *args])
    if ran_module == module and ran.get("--config") == wanted.get("--config") and wanted.keys() <= ran.keys():
      return True
  return False


def uncovered_commands(invocations, guides=GUIDES) -> list:
  """The guides' commands that no invocation (module, args) covers and no result link follows.

  conftest.py calls this at the end of a whole-suite session with every binary the tests
  started (in any xdist worker), and fails the session if it lists any."""
  missing = []
  for path in guides:
    for line, after in commands(path.read_text()):
      module, wanted = flags(shlex.split(line))
      if not run_by_a_test(module, wanted, invocations) and not RESULT_LINK.search(after):
        missing.append(f"{os.path.relpath(path, REPO)}: {line}")
  return missing


def test_commands_are_parsed_with_their_flags_and_result_links():
  text = "```python\nprint()\n```\n```\nX=1 python -m experiments.train --config=c.py \\\n    --config.a=2 --workdir=/w\n```\nSee [r](results.md#the-run).\n"
  ((line, after),) = commands(text)
  assert flags(shlex.split(line)) == ("experiments.train", {"--config": "c.py", "--config.a": "2", "--workdir": "/w"})
  assert RESULT_LINK.search(after)


def test_a_command_is_covered_by_a_run_with_its_config_and_flags_or_by_a_result_link(tmp_path):
  guide = tmp_path / "guide.md"
  guide.write_text(
    "```\npython -m experiments.train --config=configs/mnist.py --workdir=/tmp/a --config.num_epochs=1\n```\n\n"
    "```\npython -m experiments.evaluate --workdir=/tmp/a\n```\nMeasured: [there](results.md#mnist).\n"
  )
  tested = [["experiments.train", ["--config=configs/mnist.py", "--config.num_epochs=3", "--workdir=/w", "--x=1"]]]
  other_config = [["experiments.train", ["--config=configs/cats_dogs.py", "--config.num_epochs=3", "--workdir=/w"]]]
  fewer_flags = [["experiments.train", ["--config=configs/mnist.py", "--workdir=/w"]]]
  check = lambda invocations: uncovered_commands(invocations, [guide])  # noqa: E731
  assert check(tested) == []
  for invocations in (other_config, fewer_flags, []):
    assert len(check(invocations)) == 1 and "experiments.train" in check(invocations)[0]
