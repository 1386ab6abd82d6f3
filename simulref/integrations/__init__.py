"""Adapters to other tools. Each submodule imports its tool only when it is imported
itself, so ``import simulref`` never needs them.

- :mod:`simulref.integrations.simuleval_agent`: a SimulEval 1.1.x text-to-text agent
  (see docs/simuleval.md).
"""
