"""`pdmesh sim`: a discrete-event simulation of a mesh that places requests with the scheduler's
own policy objects.

    clock      the event loop: a heap of (time, sequence, callback), virtual seconds
    cache      a simulated worker's prefix cache: LRU blocks, the events a load report carries
    workers    simulated prefill and decode workers: the engine's batching, timed by a profile
    mesh       one simulated mesh: the scheduler's registry, ledger, policy and placer, the
               workers, and each request's way through them (the flow's steps, in virtual time)
    workload   the requests: a Mooncake trace (lengths and time scaled) or Poisson/gamma arrivals
    run        one (policy, load) run, a sweep of loads, DistServe's goodput search
    report     the console table, the JSON, the PNG (attainment against rate, a line per policy)
    cli        the command line

Nothing of the scheduler is re-implemented here: placement is services.scheduler's Placer with
the policy made by name, calibration its Registry and predictors fed by simulated load reports.
What is simulated is the workers (services/worker + engine) and the time.
"""
