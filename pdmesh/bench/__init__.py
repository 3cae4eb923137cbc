"""`pdmesh bench`: measure a running mesh (or any server a backend speaks to) under load.

    workload   what to send: prompts (random token ids or text) and output lengths, fixed or drawn
    trace      Mooncake-format traces: arrivals and lengths scaled, shared prefixes rebuilt
    arrivals   when to send: Poisson or gamma-bursty arrival times, seeded
    backend    how to send: the Backend contract; grpc_backend (pdmesh's client library) and
               openai_backend (any OpenAI-compatible server, httpx)
    runner     one load point: requests at a concurrency or at their arrival times, timed per chunk
    metrics    per-request results -> one run's figures (percentiles, TPOT, ITL, goodput)
    records    each request's record in the JSON, and reading it back
    report     the JSON file, the console table, the PNG
    plan       the sweep's load points and each point's requests, from the command line (cli)
    serve      `pdmesh bench serve`: a sweep of load points, end to end
    score      `pdmesh bench score`: saved runs judged again at other SLOs
"""
