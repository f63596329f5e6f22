"""The docs tell what runs: README's commands are CI's, and every command in the guides is
one the tests run or names the RESULTS.md / BENCHMARKS.md entry that ran it."""

import re
import shlex

import pytest

from tests.conftest import INVOCATIONS, REPO, WHOLE_SUITE

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
    for line in block.group(2).replace("\\\n", " ").splitlines():
      if "python -m experiments." in line:
        yield line.strip(), after


def flags(words):
  """The module and {flag name: value} of `[VAR=value ...] python -m module --flag=value ...`."""
  words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]
  assert words[:2] == ["python", "-m"], words
  return words[2], dict(w.split("=", 1) if "=" in w else (w, "") for w in words[3:] if w.startswith("--"))


def run_by_a_test(module: str, wanted: dict) -> bool:
  """Whether a test ran `module` with the same --config file and every flag the command sets."""
  for ran_module, args in INVOCATIONS:
    _, ran = flags(["python", "-m", ran_module, *args])
    if ran_module == module and ran.get("--config") == wanted.get("--config") and wanted.keys() <= ran.keys():
      return True
  return False


def test_commands_are_parsed_with_their_flags_and_result_links():
  text = "```python\nprint()\n```\n```\nX=1 python -m experiments.train --config=c.py \\\n    --config.a=2 --workdir=/w\n```\nSee [r](results.md#the-run).\n"
  ((line, after),) = commands(text)
  assert flags(shlex.split(line)) == ("experiments.train", {"--config": "c.py", "--config.a": "2", "--workdir": "/w"})
  assert RESULT_LINK.search(after)


@pytest.mark.slow
@pytest.mark.after_suite
def test_every_guide_command_is_run_by_a_test_or_names_its_result(request):
  if not request.config.stash.get(WHOLE_SUITE, False):
    pytest.skip("needs the whole suite's binaries (run without -k, -m or test paths)")
  missing = []
  for path in GUIDES:
    for line, after in commands(path.read_text()):
      module, wanted = flags(shlex.split(line))
      if not run_by_a_test(module, wanted) and not RESULT_LINK.search(after):
        missing.append(f"{path.relative_to(REPO)}: {line}")
  assert not missing, "no test runs these and no RESULTS/BENCHMARKS link follows them:\n" + "\n".join(missing)
