from pneumonia.cli import main

raise SystemExit(main())
