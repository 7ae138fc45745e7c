"""Deliberately broken variants of the product ("mutants"), kept on the test side.

Each guarantee the suite claims (nothing lost, refused, rolled back, isolated, gated on a bound) has a
check function shared by the real test and by a mutant test: the real test runs it against the product
and expects it to pass; the mutant test runs it against one broken variant and expects it to fail. A
check that still passes with the mutant in place proves nothing.

A mutant replaces one product function or class from the test side only (a subclass, a wrapper, a
monkeypatch): product code carries no switch for it. In-process mutants are context managers; a mutant
that must run inside a server or worker process has a module entry point,
`python -m tests.mutants.<area> <mutant> -- <the product's own arguments>`, that installs it and then
runs the product's own entry point.
"""
