"""The one command-line convention of every tool: absl flags, spelled with underscores.

`python -m xception_jax.main`, `tools.report` and `tools.input_bench` parse absl's global flags
with `app.run`. The tools that are also called as functions (`export.main(argv)`,
`predict.main(argv)`, `tools.model_info.main(argv)`, `tools.benchmark.main(argv)`,
`launch/sweep.py`) each define their flags on a `flags.FlagValues()` of their own, so that one
process can import several of them (they share names such as --model and --out) and call each
`main` more than once; `parse` re-reads the flags from their defaults on every call.

Earlier versions spelled those tools' flags with hyphens (`--sweep-segments`, `--raw-weights`,
`--no-residual`); `parse` still accepts them, so existing scripts keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys
from typing import NoReturn

from absl import flags

_HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")


def accept_hyphens(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  """Rewrites `--foo-bar[=v]` to `--foo_bar[=v]` (and `--no-foo` to `--nofoo`) for defined flags.

  Only names that are defined flags once spelled with underscores are touched, and never values
  (the `v` of `--foo-bar=v`, or the argument after a non-boolean `--foo-bar`), nor anything
  after `--`.
  """
  out = []
  args = iter(argv)
  for arg in args:
    if arg == "--":
      out += [arg, *args]
      break
    if not arg.startswith("-") or arg.strip("-") == "":
      out.append(arg)
      continue
    dashes = "--" if arg.startswith("--") else "-"
    name, equals, value = arg[len(dashes) :].partition("=")
    spelled = name.replace("-", "_")
    flag_name = spelled
    if spelled not in flag_values:  # --no-foo / --no_foo / --nofoo for a boolean --foo
      base = spelled[3:] if spelled.startswith("no_") else spelled[2:]
      if not (spelled.startswith("no") and base in flag_values and flag_values[base].boolean):
        out.append(arg)  # not ours: absl names it as unknown
        continue
      spelled, flag_name = "no" + base, base
    out.append(f"{dashes}{spelled}{equals}{value}")
    if not equals and not flag_values[flag_name].boolean:
      following = next(args, None)  # `--flag value`: the value is left as it is
      if following is not None:
        out.append(following)
  return out


def parse(
  flag_values: flags.FlagValues,
  argv: Sequence[str] | None,
  prog: str,
  description: str = "",
  positional: str = "",
  unknown_hint: str = "",
) -> list[str]:
  """Parses `argv` (without the program name; None = sys.argv[1:]) into `flag_values`.

  Every flag starts from its default, so a second call does not inherit the first's values.
  Returns the positional arguments (`positional` names them in the usage line). --help prints
  the flags and exits 0; a bad flag prints one error line and exits 2, as argparse did for
  these tools (`unknown_hint` is added to the line for an unknown flag).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  before_separator = argv[: argv.index("--")] if "--" in argv else argv
  if any(arg in _HELP for arg in before_separator):
    listing = flag_values.get_help(include_special_flags=False).splitlines()
    flag_lines = [line for line in listing if line.startswith(" ")]  # not the module headers
    print(f"usage: {prog} [flags] {positional}".rstrip())
    print(f"\n{description.strip()}\n\nflags:\n" + "\n".join(flag_lines))
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    return flag_values([prog, *accept_hyphens(argv, flag_values)])[1:]
  except flags.UnrecognizedFlagError as e:
    suggestions = getattr(e, "suggestions", None)  # absl >= 2.2
    guess = f" (did you mean --{suggestions[0]}?)" if suggestions else ""
    usage_error(prog, f"unrecognised argument {e.flagvalue or e.flagname!r}{guess}{unknown_hint}")
  except (flags.Error, ValueError) as e:
    usage_error(prog, str(e))


def usage_error(prog: str, message: str) -> NoReturn:
  """One line naming the problem on stderr, and exit status 2 (a bad command line)."""
  print(f"{prog}: error: {message} (--help lists the flags)", file=sys.stderr)
  raise SystemExit(2)
