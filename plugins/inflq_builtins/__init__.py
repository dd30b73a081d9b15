"""inflq's built-in plugins. They register through the public hooks and the ``inflq`` entry-point
group exactly as a third-party plugin does; copy one to start your own."""
