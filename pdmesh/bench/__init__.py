"""`pdmesh bench`: measure a running mesh (or any server a backend speaks to) under load.

    workload   what to send: prompts (random token ids or text) and output lengths, fixed or drawn
    trace      Mooncake-format traces: arrivals and lengths scaled, shared prefixes rebuilt
    arrivals   when to send: Poisson or gamma-bursty arrival times, seeded
    backend    how to send: the Backend contract and the gRPC backend (pdmesh's client library)
    runner     one load point: requests at a concurrency or at their arrival times, timed per chunk
    metrics    per-request results -> one run's figures (percentiles, TPOT, ITL, goodput)
    report     the JSON file, the console table, the PNG
    serve      `pdmesh bench serve`: a sweep of load points, end to end
"""
