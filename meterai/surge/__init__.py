"""`meterai surge`: a deadline rush replayed against a running stack, with a report.

- `plan`: what to simulate (applicants, arrival curve, distributors), shared by both processes;
- `load`: the simulated people, as Locust users (gevent; runs in a process of its own, so that
  gevent's monkey-patching never reaches the asyncio code of the rest);
- `prepare`: the stack, distributors, serials and the room's settings before the run;
- `records`: what the load process writes and the rest reads back;
- `checks`: the invariants, checked against the databases after the run;
- `report`: charts (matplotlib) and the HTML page;
- `run`: all of it in order, for the CLI.
"""
