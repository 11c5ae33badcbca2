from launch.config.reference import reference_markdown

print(reference_markdown())
