"""The study: presets, their expansion into run configurations, and the runner that trains them as child runs."""
