"""`glmtune ui`: a gradio page over the same functions the CLI calls (gradio is imported lazily).

app.py assembles the tabs (data, config, train, evaluate, chat; synthesize / align when installed);
workspace.py confines every path to --workspace; jobs.py runs long commands as child processes.
"""
