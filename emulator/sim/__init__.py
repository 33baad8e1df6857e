"""The discrete-event fleet simulator: N emulated engines, the router's policy code, virtual time.

The engines are the live emulator's engine model; the router is modelled by what it knows (its own
accounting, scraped engine metrics with their delay, its prefix index) and asks the same policy objects
the live router asks. A run writes the same summary as the load generator.
"""

from emulator.sim.fleet import FleetSimulator, SimConfig, SimResult

__all__ = ["FleetSimulator", "SimConfig", "SimResult"]
